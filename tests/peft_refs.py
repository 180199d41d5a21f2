"""The PEFT side of the LoRA/DoRA parity tests: a tiny transformers model wrapped by `peft.get_peft_model`
with nonzero B (and a perturbed DoRA magnitude), its loss and adapter gradients on fixed tokens, and
five torch AdamW steps with megaloom's hyper-parameters (its learning-rate schedule, decay on matrices
only, clipping), plus the megaloom side: any layout built by `setup_training` with the same adapters
loaded from PEFT's state dict."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megaloom.config import Config, load_config
from megaloom.train.optim import lr_at
from tests.tiny_pretrained import VOCAB

# model.seq_len + 1 of the tiny models: pipeline stages exchange whole sequences
TOKENS = torch.randint(0, VOCAB, (2, 65), generator=torch.Generator().manual_seed(1))
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}
STEPS = 5


def sets(directory, method: str, family: str, tp: int = 1, pp: int = 1, dp: int = 1, zero: int = 0,
         sp: bool = False) -> list[str]:
    return [f"model.pretrained='{directory}'", f"peft.method='{method}'", "peft.rank=4", "peft.alpha=8",
            f"peft.targets={TARGETS[family]}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}",
            f"parallel.zero={zero}", f"parallel.sequence_parallel={str(sp).lower()}", "parallel.schedule='gpipe'",
            "train.micro_batch=1", "train.global_batch=2",
            f"train.steps={STEPS}", "train.warmup=1", "train.lr=0.01", "train.min_lr=0.001", "train.grad_clip=1.0",
            "train.weight_decay=0.1"]


def peft_model(directory, cfg: Config, seed: int = 5, base: dict | None = None, perturb_magnitudes: bool = True):
    """transformers + PEFT with this run's LoRA config; B (and DoRA's magnitude) made nonzero/perturbed.
    `base`: Hugging Face tensors that replace the model's own (QLoRA: the NF4-dequantised weights).
    perturb_magnitudes=False keeps DoRA's magnitudes as PEFT initialises them (the base's row norms)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    p = cfg.peft
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if base is not None:
        hf.load_state_dict(base, strict=False)
    lc = LoraConfig(r=p.rank, lora_alpha=p.alpha, target_modules=list(p.targets), use_dora=p.method == "dora",
                    use_rslora=p.rslora, lora_dropout=0.0, fan_in_fan_out=cfg.model.family == "gpt2",
                    task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # PEFT draws A from the global generator: the same adapters on every call
    model = get_peft_model(hf, lc)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, q in model.named_parameters():
            if "lora_B" in name:
                q.copy_(torch.randn(q.shape, generator=gen) * 0.05)
            elif "lora_magnitude_vector" in name and perturb_magnitudes:
                q.mul_(1 + 0.1 * torch.randn(q.shape, generator=gen))
    return model


def peft_loss(model, tokens=TOKENS) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def reference(directory, cfg: Config, base: dict | None = None) -> dict:
    """PEFT's adapter state dict, the gradients of its first step and the losses of five AdamW steps."""
    from peft import get_peft_model_state_dict

    model = peft_model(directory, cfg, base=base)
    state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    params = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    t = cfg.train
    groups = [{"params": [q for _, q in params if q.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [q for _, q in params if q.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    losses, grads = [], {}
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        opt.zero_grad()
        loss = peft_loss(model)
        loss.backward()
        if step == 0:
            grads = {_peft_key(n): q.grad.clone() for n, q in params}
        torch.nn.utils.clip_grad_norm_([q for _, q in params], t.grad_clip)
        opt.step()
        losses.append(loss.item())
    return {"state": state, "grads": grads, "losses": losses}


def _peft_key(name: str) -> str:
    """A PEFT parameter name as get_peft_model_state_dict writes it (no adapter name)."""
    name = name.replace(".default.weight", ".weight").replace(".default", "")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")


def megaloom_run(directory, overrides: list[str], state: dict, rank: int = 0, world: int = 1, grid=None):
    """setup_training in the layout of `overrides` (a fresh grid unless given), PEFT's adapters loaded,
    five steps: the losses (on every rank), the first step's full adapter gradients by PEFT key (those
    this rank holds), and the run's parts."""
    from megaloom.interop import PretrainedWeights
    from megaloom.parallel.launch import LaunchEnv, start
    from megaloom.train.assemble import setup_training
    from megaloom.train.sharded_state import model_entries
    from megaloom.tune.peft import PeftHook, chunks_of, from_peft, peft_names, place

    cfg = load_config(None, overrides)
    if grid is None:
        grid, _ = start(cfg, LaunchEnv(rank, world))
    hook = PeftHook(cfg)
    parts = setup_training(cfg, grid, torch.device("cpu"), adapt=hook)
    PretrainedWeights(cfg.model)(model_entries(parts.model, lambda q: not q.requires_grad))
    hook.loaded(parts.model, fresh=True)
    names = peft_names(parts.model, cfg)
    params = {n: q for c in chunks_of(parts.model) for n, q in c.named_parameters()}
    for name, (key, _) in names.items():
        place(params[name], from_peft(cfg, name, state[key]))
    grads = {}

    def first(step: int) -> None:
        if step == 0 and cfg.parallel.zero != 1:  # ZeRO-1 keeps the averaged gradient only in a rank's own ranges
            grads.update({key: full_grad(params[name], spec, grid) for name, (key, spec) in names.items()})

    losses = adamw_steps(parts, cfg, grid, TOKENS, STEPS, after=first)
    return losses, grads, parts, cfg


def adapter_state(directory, method: str, family: str = "llama") -> dict[str, torch.Tensor]:
    """PEFT's adapters of `peft_model` (B nonzero, DoRA's magnitudes perturbed), by PEFT key."""
    from peft import get_peft_model_state_dict

    model = peft_model(directory, load_config(None, sets(directory, method, family)))
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def seeded_run(directory, method: str, extra: list[str], state: dict, grid=None, family: str = "llama",
               **layout):  # noqa: ANN001, ANN201
    """`megaloom_run` of `sets(...)` + `extra` in `layout`, with the dropout masks of train.seed (the
    global seed, as the trainer sets it; spawned workers would otherwise draw their own)."""
    overrides = [*sets(directory, method, family, **layout), *extra]
    torch.manual_seed(load_config(None, overrides).train.seed)
    return megaloom_run(directory, overrides, state, grid=grid)


def adamw_steps(parts, cfg, grid, tokens, steps, after=None):  # noqa: ANN001, ANN201
    """`steps` optimizer steps of the trainer's own step function on this data-parallel rank's slice of
    `tokens` (rows of seq_len + 1), the same batch every step; each step's loss over the whole grid.
    `after(step)` runs after each step (before the next zeroes the gradients)."""
    import torch.distributed as dist

    from megaloom.train.optim import lr_at, set_lr
    from megaloom.train.step import train_step

    t = cfg.train
    per_rank = t.global_batch // grid.dp
    batch = tokens[grid.dp_rank * per_rank:(grid.dp_rank + 1) * per_rank]
    micro = list(zip(batch[:, :-1].split(t.micro_batch), batch[:, 1:].split(t.micro_batch)))
    losses = []
    for step in range(steps):
        set_lr(parts.optimizer, lr_at(step, t))
        result = train_step(parts.model, parts.optimizer, micro, sync=parts.sync, pipeline=parts.runner,
                            grad_clip=t.grad_clip)
        loss = result.loss.detach().clone()
        if grid.pp > 1:
            dist.all_reduce(loss, group=grid.pp_group)
        if grid.dp > 1:
            dist.all_reduce(loss, group=grid.dp_group)
            loss /= grid.dp
        losses.append(loss.item())
        if after is not None:
            after(step)
    return losses


def full_grad(param, spec, grid) -> torch.Tensor:
    """The whole gradient of an adapter parameter: its tp shards assembled (ZeRO-2's dp shards first)."""
    g = param.grad
    if hasattr(g, "full_tensor"):
        g = g.full_tensor()
    if spec is None or grid.tp == 1:
        return g.detach().clone()
    parts = [torch.empty_like(g) for _ in range(grid.tp)]
    dist.all_gather(parts, g.contiguous(), group=grid.tp_group)
    return spec.assemble(parts)


def compare(ours: tuple, ref: dict, what: str) -> tuple[float, float, float]:
    """Max |loss difference| of the first step, max |gradient difference| (of the adapters this rank
    holds whole gradients of: none under ZeRO-1), max |difference| over the five losses; asserts the
    parity bounds (1e-5, 1e-5, 1e-4)."""
    losses, grads = ours[0], ours[1]
    d_loss = abs(losses[0] - ref["losses"][0])
    d_grad = max((grads[k] - ref["grads"][k]).abs().max().item() for k in grads) if grads else 0.0
    d_steps = max(abs(a - b) for a, b in zip(losses, ref["losses"]))
    assert math.isfinite(d_steps)
    assert d_loss <= 1e-5, f"{what}: loss {losses[0]} vs PEFT {ref['losses'][0]}"
    assert d_grad <= 1e-5, f"{what}: adapter gradients differ from PEFT's by {d_grad}"
    assert d_steps <= 1e-4, f"{what}: five AdamW steps {losses} vs PEFT {ref['losses']}"
    return d_loss, d_grad, d_steps
