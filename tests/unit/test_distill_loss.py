"""megaloom's chunked distillation loss (megaloom/compress/distill_loss.py) equals TRL's `generalized_jsd_loss`
and torchtune's `ForwardKLLoss` / `ReverseKLLoss` on the same logits, values and gradients to 1e-6 (fp64), with
chunks smaller than the token count; the vocabulary split over 2 real tp ranks is in
tests/distributed/test_distill_layouts.py. Also: a student built from teacher layers [0, 2] holds exactly them."""

from dataclasses import replace

import pytest
import torch

from megaloom.compress.distill_loss import distill_loss
from megaloom.config import ConfigError
from tests.distill_refs import reference, torchtune_kd


def _inputs(seed=0, b=2, t=5, hidden=8, vocab=13, teacher_hidden=6):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    th = torch.randn(b, t, teacher_hidden, generator=g, dtype=torch.float64)
    tw = torch.randn(vocab, teacher_hidden, generator=g, dtype=torch.float64) * 1.5
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[0, :2] = -100
    labels[1, 4] = -100
    return h, w, th, tw, labels


@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (2.0, 0.0), (0.7, 0.4)])
def test_matches_trl(loss, beta, temperature, alpha):
    h, w, th, tw, labels = _inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    terms = distill_loss(h1, w1, th, tw, labels, loss=loss, beta=beta, temperature=temperature, alpha=alpha, chunk=3)
    terms.loss.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = reference(h2 @ w2.T, th @ tw.T, labels, loss, beta, temperature, alpha)
    ref.backward()
    assert terms.loss.item() == pytest.approx(ref.item(), abs=1e-6, rel=1e-6)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6, rtol=1e-6)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-6, rtol=1e-6)
    pure = reference(h @ w.T, th @ tw.T, labels, loss, beta, temperature, 0.0)
    assert terms.kd.item() == pytest.approx(pure.item(), abs=1e-6)
    assert h1.grad[0, :2].abs().max() == 0  # masked tokens take no part


def test_matches_torchtune():
    """torchtune's ForwardKLLoss is the cross entropy -Σ q log p = KL(q || p) + H(q): the same gradient, a value
    larger by the teacher's entropy over the scored tokens; its ReverseKLLoss is KL(p || q) itself."""
    tt = torchtune_kd()
    h, w, th, tw, labels = _inputs(seed=1)
    teacher = th @ tw.T
    q = teacher.softmax(-1)
    entropy = -(q * q.log()).sum(-1)[labels != -100].mean()
    for loss, ref_loss, offset in (("forward_kl", tt.ForwardKLLoss(), entropy), ("reverse_kl", tt.ReverseKLLoss(), 0)):
        h1 = h.clone().requires_grad_()
        ours = distill_loss(h1, w, th, tw, labels, loss=loss, chunk=4).loss
        ours.backward()
        h2 = h.clone().requires_grad_()
        ref = ref_loss((h2 @ w.T).reshape(-1, w.shape[0]), teacher.reshape(-1, w.shape[0]), labels)
        ref.backward()
        assert ours.item() + float(offset) == pytest.approx(ref.item(), abs=1e-6), loss
        assert torch.allclose(h1.grad, h2.grad, atol=1e-6), loss


def test_student_from_teacher_layers(tmp_path):
    """distill.init_from_teacher_layers = [0, 2] of a 4-layer teacher (a Hugging Face directory): the student's
    layers 0 and 1 are the teacher's 0 and 2, its embedding, final norm and head the teacher's, to the bit."""
    from megaloom.compress.distill import TeacherLayers
    from megaloom.config import load_config
    from megaloom.interop.load import load_model
    from megaloom.model.transformer import Transformer
    from megaloom.train.sharded_state import model_entries
    from tests.tiny_pretrained import make

    teacher_dir = make("llama-gqa", tmp_path / "teacher", layers=4)
    teacher, _, tcfg = load_model(teacher_dir)
    m = tcfg.model
    cfg = load_config(None, ["model.family='llama'", "model.layers=2", f"model.hidden={m.hidden}",
                             f"model.heads={m.heads}", f"model.kv_heads={m.n_kv_heads}", f"model.ffn_hidden={m.ffn}",
                             f"model.vocab_size={m.vocab_size}", f"model.head='{m.head}'", "model.seq_len=32",
                             f"model.max_positions={m.positions}", f"model.rope_theta={m.rope_theta}",
                             f"model.norm_eps={m.norm_eps}", f"model.qkv_bias={str(m.qkv_bias).lower()}",
                             "data.vocab_size=300", "train.objective='distill'", f"distill.teacher='{teacher_dir}'",
                             "distill.init_from_teacher_layers=[0, 2]"])
    student = Transformer(cfg.model)
    TeacherLayers(cfg)(model_entries(student))
    ts = teacher.state_dict()
    names = {k: k for k in student.state_dict() if not k.startswith("layers.")}
    names.update({k: k.replace("layers.1.", "layers.2.") for k in student.state_dict() if k.startswith("layers.1.")})
    names.update({k: k for k in student.state_dict() if k.startswith("layers.0.")})
    for mine, theirs in names.items():
        assert torch.equal(student.state_dict()[mine], ts[theirs]), mine
    bad = replace(cfg, distill=replace(cfg.distill, init_from_teacher_layers=[0, 4]))
    with pytest.raises(ConfigError, match="names layer 4"):
        TeacherLayers(bad)


@pytest.mark.parametrize("sets,match", [
    ([], "needs distill.teacher"),
    (["distill.teacher='t'", "distill.loss='jsd'", "distill.beta=1.0"], "beta = 1.0 must be in"),
    (["distill.teacher='t'", "distill.alpha=1.5"], "alpha = 1.5"),
    (["distill.teacher='t'", "distill.init_from_teacher_layers=[0, 0]"], "2 distinct teacher layers"),
])
def test_config_errors(sets, match):
    from megaloom.config import load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.layers=2", "train.objective='distill'", *sets])


def test_tokenizer_difference(tmp_path):
    from megaloom.compress.distill import tokenizer_difference
    from megaloom.data.tokenizer import train_bpe

    a = train_bpe(["def f(x):\n    return x\n"] * 20, 300)
    b = train_bpe(["the quick brown fox\n"] * 20, 300)
    assert tokenizer_difference(a, a) is None
    assert "entries" in tokenizer_difference(a, b)
