"""PEFT + transformers as the reference of megaloom's (IA)³, prefix and prompt tuning: the same tiny base
(tests/tiny_pretrained.py), the same adapter values (drawn here, loaded into both), the same tokens; the
loss and the gradients of the adapter tensors, keyed by PEFT's state-dict keys.

Loss convention: megaloom trains on (x, y = next tokens); transformers on input_ids = labels = s, shifting
inside. With s = x followed by y's last token both see the same T predictions; for prompt tuning the
label of s[0] is -100, so the last virtual token (which PEFT would let predict s[0]) predicts nothing,
as in megaloom (there is no target for the first token)."""

from __future__ import annotations

import torch

from megaloom.parallel.tensor import gather_full
from megaloom.tune.peft import place

VT = 4  # virtual tokens
METHODS = ("ia3", "prefix", "prompt")


def peft_config(method: str, layers: int):  # noqa: ANN201 (a peft config)
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig

    if method == "ia3":
        return IA3Config(task_type="CAUSAL_LM")
    if method == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VT)
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VT)


def adapter_values(shapes: dict[str, tuple[int, ...]], method: str) -> dict[str, torch.Tensor]:
    """Adapter tensors away from their initial values (ones for IA3), so that every entry matters."""
    gen = torch.Generator().manual_seed(7)
    out = {}
    for key in sorted(shapes):
        noise = torch.randn(shapes[key], generator=gen)
        out[key] = 1.0 + 0.2 * noise if method == "ia3" else 0.5 * noise
    return out


def peft_model(directory, method: str):  # noqa: ANN001, ANN201
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model = get_peft_model(base, peft_config(method, base.config.num_hidden_layers))
    return model.eval()  # no dropout (GPT-2's config has 0.1); gradients flow all the same


def _key(name: str) -> str:
    """A PEFT parameter name -> its get_peft_model_state_dict key."""
    if name.startswith("prompt_encoder."):
        return "prompt_embeddings"
    return name.replace(".default", "")


def reference(directory, method: str, x: torch.Tensor, y: torch.Tensor, keep: dict | None = None,
              ) -> tuple[float, dict, dict]:
    """(loss, adapter values, their gradients) of PEFT on tokens (x, y), keys as PEFT saves them; the
    PEFT model itself into `keep[method]` when given."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model = peft_model(directory, method)
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    values = adapter_values(shapes, method)
    set_peft_model_state_dict(model, values)
    s = torch.cat([x, y[:, -1:]], dim=1)
    labels = s.clone()
    if method == "prompt":
        labels[:, 0] = -100
    loss = model(input_ids=s, labels=labels).loss
    loss.backward()
    grads = {_key(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if keep is not None:
        keep[method] = model
    return loss.item(), values, grads


def load_into(model, method_module, values: dict, cfg) -> None:  # noqa: ANN001
    """PEFT's adapter values into this rank's megaloom parameters (every chunk of `model`)."""
    chunks = list(model) if isinstance(model, torch.nn.ModuleList) else [model]
    for chunk in chunks:
        params = dict(chunk.named_parameters())
        for name, (key, _) in method_module.peft_names(chunk).items():
            full = values[key]
            if hasattr(method_module, "from_peft"):
                full = method_module.from_peft(name, full, cfg)
            place(params[name], full)  # its tp shard (and ZeRO-3 dp shard) of the full tensor


def megaloom_grads(model, method_module, cfg, tp) -> dict:  # noqa: ANN001
    """Full gradients of this rank's adapter parameters, as PEFT tensors where a parameter is a whole one,
    else (prefix tuning) by megaloom name (compare against the PEFT tensor's columns: `expected_grad`)."""
    chunks = list(model) if isinstance(model, torch.nn.ModuleList) else [model]
    out = {}
    for chunk in chunks:
        params = dict(chunk.named_parameters())
        for name, (key, spec) in method_module.peft_names(chunk).items():
            g = params[name].grad
            g.shard_spec = spec
            out[name] = (key, gather_full(g, tp) if spec is not None else g.detach())
    return out


def expected_grad(name: str, key: str, grads: dict, method_module, cfg) -> torch.Tensor:  # noqa: ANN001
    full = grads[key]
    if hasattr(method_module, "from_peft"):
        full = method_module.from_peft(name, full, cfg)
    return full


def peft_text_prompt(directory, text: str) -> torch.Tensor:  # noqa: ANN001
    """PEFT's TEXT-initialised soft prompt (VT rows) for the model and tokenizer in `directory`."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VT, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text=text, tokenizer_name_or_path=str(directory))
    return get_peft_model(base, config).prompt_encoder["default"].embedding.weight.detach().clone()


STEPS = 5


def step_sets(directory, method: str, tp: int = 1, pp: int = 1, dp: int = 1, zero: int = 0, seq: int = 16) -> list[str]:
    """A PEFT run of `method` on the tiny model in `directory`: megaloom's optimizer settings for five steps."""
    return [f"model.pretrained='{directory}'", f"model.seq_len={seq}", f"peft.method='{method}'",
            f"peft.virtual_tokens={VT}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}",
            f"parallel.zero={zero}", "parallel.schedule='gpipe'", "train.micro_batch=1", "train.global_batch=2",
            f"train.steps={STEPS}", "train.warmup=1", "train.lr=0.01", "train.min_lr=0.001", "train.grad_clip=1.0",
            "train.weight_decay=0.1"]


def peft_steps(directory, method: str, cfg, tokens: torch.Tensor) -> tuple[list[float], dict]:  # noqa: ANN001
    """PEFT's five AdamW steps with megaloom's schedule, decay on matrices only and clipping, from
    `adapter_values`: the losses and the adapter values it started from."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from megaloom.train.optim import lr_at

    model = peft_model(directory, method)
    values = adapter_values({k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}, method)
    set_peft_model_state_dict(model, values)
    params = [q for q in model.parameters() if q.requires_grad]
    t = cfg.train
    groups = [{"params": [q for q in params if q.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    labels = tokens.clone()
    if method == "prompt":
        labels[:, 0] = -100  # the last virtual token predicts nothing (module docstring)
    losses = []
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t)
        opt.zero_grad()
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses, values


def megaloom_steps(directory, method_module, overrides: list[str], values: dict, tokens: torch.Tensor,  # noqa: ANN001
                   rank: int = 0, world: int = 1) -> list[float]:
    """The trainer's parts (setup_training with the PEFT hook) in the layout of `overrides`, PEFT's
    adapter values loaded, five train steps on (tokens[:, :-1], tokens[:, 1:]): the losses, on every rank."""

    from megaloom.config import load_config
    from megaloom.interop import PretrainedWeights
    from megaloom.parallel.launch import LaunchEnv, start
    from megaloom.train.assemble import setup_training
    from megaloom.train.sharded_state import model_entries
    from megaloom.tune.peft import PeftHook

    cfg = load_config(None, overrides)
    grid, _ = start(cfg, LaunchEnv(rank, world))
    hook = PeftHook(cfg)
    parts = setup_training(cfg, grid, torch.device("cpu"), adapt=hook)
    PretrainedWeights(cfg.model)(model_entries(parts.model, lambda q: not q.requires_grad))
    hook.loaded(parts.model, fresh=True)
    load_into(parts.model, method_module, values, cfg)
    from tests.peft_refs import adamw_steps

    return adamw_steps(parts, cfg, grid, tokens, STEPS)
