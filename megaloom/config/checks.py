"""Validation: every rule a config must satisfy before anything is built, each failure one line naming the
key, the value and the fix."""

from __future__ import annotations

from pathlib import Path

from megaloom.config.pretrained import PEFT_TARGETS
from megaloom.config.schema import SWITCHABLE_PEFT, Config, get_value, toml_value
from megaloom.errors import ConfigError
from megaloom.layout import LayoutSpec, check_layout


def _check_peft(cfg: Config) -> None:
    """[peft]: ranges, targets the family has, and what each method composes with."""
    p, m = cfg.peft, cfg.model
    if p.method == "none":
        for key, value in (("peft.quantize_base", p.quantize_base != "none"), ("peft.init", p.init),
                           ("peft.targets", p.targets), ("peft.reference", p.reference != "auto")):
            if value:
                raise ConfigError(f"{key} = {toml_value(get_value(cfg, key))} needs a peft.method (lora, dora, "
                                  "adapter, prefix, prompt or ia3); set one or remove it")
        return
    if p.rank < 1:
        raise ConfigError(f"peft.rank = {p.rank} must be at least 1; typical ranks are 4 .. 64")
    if p.alpha <= 0:
        raise ConfigError(f"peft.alpha = {p.alpha} must be positive; PEFT's default is 8, twice the rank is common")
    if not 0.0 <= p.dropout < 1.0:
        raise ConfigError(f"peft.dropout = {p.dropout} must be in [0, 1)")
    for key in ("peft.bottleneck", "peft.virtual_tokens"):
        if get_value(cfg, key) < 1:
            raise ConfigError(f"{key} = {get_value(cfg, key)} must be at least 1")
    known = PEFT_TARGETS[m.family]
    if p.method == "ia3" and m.family == "gpt2":  # (IA)³ scales attention's c_proj output, the MLP's c_proj input
        known = (*known, "attn.c_proj", "mlp.c_proj")
    for target in p.targets:
        if target not in known:
            raise ConfigError(f"peft.targets has {target!r}, which a {m.family} model does not have; pick from "
                              f"{' '.join(known)}")
    if len(set(p.targets)) != len(p.targets):
        raise ConfigError(f"peft.targets = {p.targets} names a module twice; list each once")
    if p.method in ("prefix", "prompt"):
        _check_virtual_tokens(cfg)
    if p.reference == "adapters_off" and p.method not in SWITCHABLE_PEFT:
        raise ConfigError(f"peft.reference = \"adapters_off\" but peft.method = \"{p.method}\" changes the sequence the "
                          "model sees and has no switch; set peft.reference = \"copy\" (or \"auto\")")
    lora = p.method in ("lora", "dora")
    if p.quantize_base != "none" and not lora:
        raise ConfigError(f"peft.quantize_base = \"{p.quantize_base}\" (QLoRA) needs peft.method lora or dora "
                          f"(got {p.method}); set peft.quantize_base = \"none\"")


def _check_qat(cfg: Config) -> None:
    """[qat]: a group size that tiles every block linear's input features (each tp rank's share of the
    row-parallel ones: a group must not straddle two ranks), and what QAT composes with."""
    q, m, tp = cfg.qat, cfg.model, cfg.parallel.tp
    if q.scheme == "none":
        if q.group_size:
            raise ConfigError(f"qat.group_size = {q.group_size} needs a qat.scheme (int4-weight, int8-weight or "
                              "int8-dynamic-act-int4-weight); set one or remove it")
        return
    if q.group_size < 0 or q.group_size == 1:
        raise ConfigError(f"qat.group_size = {q.group_size} must be 0 (the scheme's default) or at least 2, e.g. 32")
    group = q.group_size or (0 if q.scheme == "int8-weight" else 32)
    widths = (("attn.qkv", m.hidden, 1), ("attn.proj", m.heads * m.head_dim, tp), ("mlp.up", m.hidden, 1),
              ("mlp.down", m.ffn, tp))
    for name, width, t in widths:
        if group and (width % t or (width // t) % group):
            where = f"each of the parallel.tp = {t} ranks' {width // t} of {name}'s {width}" if t > 1 else \
                f"{name}'s {width}"
            raise ConfigError(f"qat.group_size = {group} does not divide {where} input features (a group may not "
                              f"straddle tp ranks); pick a group size that divides {width // t}, e.g. "
                              f"{_divisor_near(width // t, 32)}")
    if cfg.train.objective not in ("lm", "sft", "distill"):
        raise ConfigError(f"qat.scheme = \"{q.scheme}\" applies to train.objective lm, sft or distill (got "
                          f"\"{cfg.train.objective}\"); set qat.scheme = \"none\"")
    if cfg.peft.method not in ("none", "lora") or cfg.peft.quantize_base != "none":
        what = f"peft.method = \"{cfg.peft.method}\"" if cfg.peft.method not in ("none", "lora") else \
            f"peft.quantize_base = \"{cfg.peft.quantize_base}\""
        raise ConfigError(f"qat.scheme = \"{q.scheme}\" composes with full training and peft.method = \"lora\" "
                          f"(its base fake-quantized), not with {what}; change one of them")
    if cfg.parallel.schedule == "zb-h1" and cfg.parallel.pp > 1:
        raise ConfigError(f"qat.scheme = \"{q.scheme}\" with parallel.schedule = \"zb-h1\": the deferred weight "
                          "gradients see the fake-quantized weight, not the parameter; use another schedule")


def _check_virtual_tokens(cfg: Config) -> None:
    """Prefix and prompt tuning put peft.virtual_tokens positions before the real tokens (megaloom/tune/prompt.py)."""
    m, p, t = cfg.model, cfg.peft, cfg.parallel.tp
    if m.family == "gpt2" and m.seq_len + p.virtual_tokens > m.positions:
        raise ConfigError(f"peft.virtual_tokens = {p.virtual_tokens}: with model.seq_len = {m.seq_len} the real tokens "
                          f"reach position {m.seq_len + p.virtual_tokens - 1}, past GPT-2's {m.positions} learned "
                          f"positions; set model.seq_len = {m.positions - p.virtual_tokens} or less")
    if p.method == "prompt" and cfg.parallel.sequence_parallel and p.virtual_tokens % t:
        raise ConfigError(f"peft.virtual_tokens = {p.virtual_tokens}: sequence parallelism splits the soft prompt's "
                          f"positions with the others over parallel.tp = {t}; make it a multiple of {t}")
    if p.method == "prompt" and p.prompt_init_text and not m.pretrained:
        raise ConfigError("peft.prompt_init_text is read with model.pretrained's tokenizer; set model.pretrained "
                          "or leave peft.prompt_init_text empty (random init)")


def validate(cfg: Config) -> None:
    """Check ranges and contradictions; one line per problem, first problem wins."""
    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    _positive(cfg, "model.layers", "model.hidden", "model.heads", "model.vocab_size", "model.seq_len")
    _positive(cfg, "train.steps", "train.global_batch", "train.micro_batch", "train.eval_batches",
              "train.sample_tokens", "parallel.tp", "parallel.pp", "parallel.dp", "parallel.chunks",
              "data.vocab_size", "log.every", "checkpoint.keep", "train.max_consecutive_skips",
              "parallel.timeout_s")
    _non_negative(cfg, "model.kv_heads", "model.ffn_hidden", "model.max_positions", "train.warmup", "train.eval_every",
                  "train.samples", "train.grad_clip", "train.weight_decay", "train.min_lr",
                  "checkpoint.every", "data.max_bytes", "data.bpe_train_bytes", "faults.at_step",
                  "faults.nonfinite_steps")
    for key, cap in (("parallel.tp", 2**20), ("parallel.pp", 2**20), ("parallel.dp", 2**20), ("parallel.chunks", 1024)):
        if get_value(cfg, key) > cap:
            raise ConfigError(f"{key} = {get_value(cfg, key)} is larger than megaloom supports ({cap}); "
                              "use a realistic size")
    if m.hidden % m.heads:
        raise ConfigError(f"model.hidden ({m.hidden}) must be a multiple of model.heads ({m.heads}); "
                          f"try model.heads={_divisor_near(m.hidden, m.heads)}")
    if m.kv_heads and m.family == "gpt2" and m.kv_heads != m.heads:
        raise ConfigError(f"model.kv_heads = {m.kv_heads}: grouped-query attention needs model.family=\"llama\"; "
                          "set model.kv_heads=0 for gpt2")
    if m.heads % m.n_kv_heads:
        raise ConfigError(f"model.heads ({m.heads}) must be a multiple of model.kv_heads ({m.kv_heads}); "
                          f"try model.kv_heads={_divisor_near(m.heads, m.n_kv_heads)}")
    if m.family == "llama" and m.head_dim % 2:
        raise ConfigError(f"rotary embeddings need an even head size, got hidden/heads = {m.head_dim}; change model.heads")
    if m.max_positions and m.seq_len > m.max_positions:
        raise ConfigError(f"model.seq_len ({m.seq_len}) exceeds model.max_positions ({m.max_positions}), the "
                          f"longest context the model supports; set model.seq_len={m.max_positions} or less")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout = {m.dropout} must be in [0, 1)")
    if not 0.0 < t.lr < 1.0:
        raise ConfigError(f"train.lr = {t.lr} must be in (0, 1); typical values are 1e-4 .. 3e-3")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction = {d.val_fraction} must be in [0, 1)")
    if d.tokenizer == "bpe" and d.vocab_size > m.vocab_size:
        raise ConfigError(f"data.vocab_size ({d.vocab_size}) exceeds model.vocab_size ({m.vocab_size}); "
                          f"set model.vocab_size={d.vocab_size} or larger")
    if d.tokenizer == "gpt2" and m.vocab_size < 50257:
        raise ConfigError(f"data.tokenizer = \"gpt2\" has 50257 tokens but model.vocab_size = {m.vocab_size}; "
                          "set model.vocab_size=50304")
    if t.samples and not t.sample_prompts:
        raise ConfigError("train.sample_prompts is empty while train.samples > 0; give a prompt, e.g. [\"def \"]")
    if not d.sources:
        raise ConfigError("data.sources is empty; give at least one source, e.g. [\"stdlib\"]")
    _check_objective(cfg)
    _check_peft(cfg)
    _check_qat(cfg)
    if p.powersgd_rank < 0 or (p.powersgd_rank and p.zero >= 2):
        raise ConfigError(f"parallel.powersgd_rank = {p.powersgd_rank} needs parallel.zero 0 or 1 (got {p.zero}) "
                          "and must not be negative; FSDP's reduce-scatter (ZeRO-2/3) is not compressed")
    check_layout(m, layout_spec(cfg))  # the same check as `megaloom simulate` and `megaloom plan`
    if cfg.peft.quantize_base == "nf4":  # before the model is built and loaded (QLoRA quantizes after loading)
        from megaloom.tune.nf4_layout import check_nf4_layout  # torch-free

        check_nf4_layout(m, p.tp, p.dp if p.zero >= 2 else 1)
    world = p.tp * p.pp * p.dp
    for key in ("faults.kill_rank", "faults.hang_rank"):
        rank = get_value(cfg, key)
        if rank >= world or rank < -1:
            raise ConfigError(f"{key} = {rank} is not a rank of this run (0..{world - 1}); use -1 to turn it off")
        if rank >= 0 and cfg.faults.at_step == 0:
            raise ConfigError(f"{key} = {rank} needs faults.at_step, the step in which it fires, e.g. faults.at_step=7")
    if cfg.faults.nonfinite_steps and cfg.faults.at_step == 0:
        raise ConfigError("faults.nonfinite_steps needs faults.at_step, the first step it poisons, e.g. faults.at_step=3")
    dev = t.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"train.device = {dev!r} is not auto, cpu, cuda or cuda:N")


def _check_objective(cfg: Config) -> None:
    """The conversation keys need an objective that reads records (sft, dpo), and those need record files."""
    d, objective = cfg.data, cfg.train.objective
    if objective == "distill":  # its data are checked as those of the objective that reads them
        _check_distill(cfg)
        objective = "lm" if cfg.distill.data == "text" else "sft"
    if objective == "lm":
        sft_only = {"data.packing": d.packing, "data.train_on_prompt": d.train_on_prompt,
                    "data.format": d.format != "auto", "data.chat_template": d.chat_template}
        for key, value in sft_only.items():
            if value:
                raise ConfigError(f"{key} = {toml_value(get_value(cfg, key))} applies to supervised fine-tuning "
                                  "only; set train.objective=\"sft\" or remove it")
        return
    if "stdlib" in d.sources:
        raise ConfigError(f"train.objective = \"{objective}\" reads conversations, but data.sources has \"stdlib\"; "
                          "give .jsonl or .parquet files, e.g. from tools/build_instruct.py")
    pairs = objective in ("dpo", "reward")
    if d.format not in ("auto", "preference") and pairs:
        raise ConfigError(f"data.format = \"{d.format}\" but train.objective = \"{objective}\" reads preference "
                          "pairs; set data.format=\"preference\" or \"auto\"")
    if d.format == "preference" and not pairs:
        raise ConfigError(f"data.format = \"preference\" is read by train.objective = \"dpo\" or \"reward\", not "
                          f"\"{objective}\"; set train.objective=\"dpo\"")
    if pairs and (d.packing or d.train_on_prompt):
        key = "data.packing" if d.packing else "data.train_on_prompt"
        raise ConfigError(f"{key} = true does not apply to preference pairs (train.objective = \"{objective}\"); "
                          "remove it")
    if objective in ("grpo", "ppo"):
        if d.format not in ("auto", "prompt"):
            raise ConfigError(f"data.format = \"{d.format}\" but train.objective = \"{objective}\" reads prompts; "
                              "set data.format=\"prompt\" or \"auto\"")
        if d.packing or d.train_on_prompt:
            raise ConfigError(f"data.packing and data.train_on_prompt do not apply to train.objective = "
                              f"\"{objective}\"; remove them")
        r, t = cfg.rl, cfg.train
        if objective == "ppo":
            rollout = r.rollout_batch or t.global_batch
            if r.ppo_epochs < 1 or rollout % t.global_batch or r.group_size < 1:
                raise ConfigError(f"rl.rollout_batch ({rollout}) must be a multiple of train.global_batch "
                                  f"({t.global_batch}), rl.ppo_epochs ({r.ppo_epochs}) and rl.group_size "
                                  f"({r.group_size}) at least 1")
            if r.kl_coef < 0 or r.kl_target < 0 or r.vf_coef < 0 or not 0 <= r.lam <= 1 or not 0 < r.gamma <= 1:
                raise ConfigError(f"rl.kl_coef ({r.kl_coef}), rl.kl_target ({r.kl_target}), rl.vf_coef ({r.vf_coef}) "
                                  f"must not be negative; rl.lam ({r.lam}) in [0, 1], rl.gamma ({r.gamma}) in (0, 1]")
        elif r.critic != "shared":
            raise ConfigError(f"rl.critic = \"{r.critic}\" applies to train.objective = \"ppo\" (GRPO has no critic); "
                              "remove it")
        if objective == "grpo" and r.group_size < 2:
            raise ConfigError(f"rl.group_size = {r.group_size}: group-normalised advantages need at least 2 "
                              "completions per prompt; use 4 or more")
        if r.max_new_tokens < 1 or r.max_new_tokens >= cfg.model.seq_len:
            raise ConfigError(f"rl.max_new_tokens = {r.max_new_tokens} must be in [1, model.seq_len = "
                              f"{cfg.model.seq_len}); leave room for the prompt")
        if r.temperature <= 0 or not 0 < r.top_p <= 1 or r.beta < 0 or r.clip <= 0:
            raise ConfigError(f"rl.temperature ({r.temperature}) and rl.clip ({r.clip}) must be positive, rl.top_p "
                              f"({r.top_p}) in (0, 1], rl.beta ({r.beta}) not negative")
        if (r.reward not in ("exact_match", "last_number") and r.reward.count(":") != 1
                and not (objective == "ppo" and Path(r.reward).is_dir())):
            raise ConfigError(f"rl.reward = \"{r.reward}\" is neither exact_match, last_number, \"module:function\" nor "
                              "(PPO) a reward model's run directory")
    elif d.format == "prompt":
        raise ConfigError(f"data.format = \"prompt\" is read by train.objective = \"grpo\" or \"ppo\", not "
                          f"\"{objective}\"")
    if cfg.reward.center_coefficient < 0:
        raise ConfigError(f"reward.center_coefficient = {cfg.reward.center_coefficient} must not be negative; "
                          "TRL suggests 0.01")
    if objective == "dpo":
        o = cfg.dpo
        if o.beta <= 0:
            raise ConfigError(f"dpo.beta = {o.beta} must be positive; typical values are 0.01 .. 0.5")
        if not 0.0 <= o.label_smoothing < 0.5 or (o.label_smoothing and o.loss in ("ipo", "hinge")):
            raise ConfigError(f"dpo.label_smoothing = {o.label_smoothing} must be in [0, 0.5) and applies to the "
                              f"sigmoid and simpo losses (dpo.loss = \"{o.loss}\"); set it to 0")


def _check_distill(cfg: Config) -> None:
    o = cfg.distill
    if not o.teacher:
        raise ConfigError("train.objective = \"distill\" needs distill.teacher, the MODEL to learn from (a run "
                          "directory, checkpoint, Hugging Face directory or .gguf)")
    if not 0.0 <= o.alpha <= 1.0:
        raise ConfigError(f"distill.alpha = {o.alpha} must be in [0, 1] (the cross entropy's weight; 0 = pure "
                          "distillation)")
    if o.temperature <= 0:
        raise ConfigError(f"distill.temperature = {o.temperature} must be positive; 1 leaves the logits as they are")
    if o.loss == "jsd" and not 0.0 < o.beta < 1.0:
        raise ConfigError(f"distill.beta = {o.beta} must be in (0, 1) for distill.loss = \"jsd\"; beta 0 and 1 are "
                          "distill.loss = \"forward_kl\" and \"reverse_kl\"")
    layers = o.init_from_teacher_layers
    if layers:
        if len(layers) != cfg.model.layers or len(set(layers)) != len(layers) or min(layers) < 0:
            raise ConfigError(f"distill.init_from_teacher_layers = {layers} must name model.layers = "
                              f"{cfg.model.layers} distinct teacher layers (0-based), one per student layer")
        if cfg.model.pretrained or cfg.checkpoint.load:
            key = "model.pretrained" if cfg.model.pretrained else "checkpoint.load"
            raise ConfigError(f"distill.init_from_teacher_layers and {key} both say where the student starts; "
                              "keep one")


def layout_spec(cfg: Config) -> LayoutSpec:
    """The config's layout, as `megaloom.layout` and the planner state it."""
    p, t = cfg.parallel, cfg.train
    return LayoutSpec(tp=p.tp, pp=p.pp, dp=p.dp, chunks=p.chunks, microbatch=t.micro_batch, global_batch=t.global_batch,
                      zero=p.zero, schedule=p.schedule, sequence_parallel=p.sequence_parallel,
                      layers_per_stage=tuple(p.layers_per_stage))


def _positive(cfg: Config, *keys: str) -> None:
    for k in keys:
        v = get_value(cfg, k)
        if v <= 0:
            raise ConfigError(f"{k} = {v} must be positive")


def _non_negative(cfg: Config, *keys: str) -> None:
    for k in keys:
        v = get_value(cfg, k)
        if v < 0:
            raise ConfigError(f"{k} = {v} must not be negative")


def _divisor_near(n: int, want: int) -> int:
    """The divisor of n closest to `want` (the smaller on a tie), looking at most 10,000 steps away:
    the values are user input and may be huge."""
    for step in range(10_000):
        for x in (want - step, want + step):
            if 1 <= x <= n and n % x == 0:
                return x
    return 1


