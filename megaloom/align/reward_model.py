"""A reward model's run directory as PPO's reward (`rl.reward = "<run dir>"`): built frozen on the policy's grid,
in the policy's (t, p, d, ZeRO) layout, as its own run built it, and read at each completion's last token.

A reward run (`train.objective = "reward"`) is the language model with a scalar head `score`. Fine-tuned with
PEFT, its checkpoints hold only what it trained (the adapters and the score head) and record the base they need;
the base is its `model.pretrained` (or, without one, the initialisation of its `train.seed`). So the reward model
is built from the reward run's own config with the reward run's own hooks (QAT's fake quantization, the PEFT
hook, then the score head, the trainer's order), its checkpoint fills what the run trained and its pretrained
weights fill the frozen base, as the trainer fills a PEFT run on resume (megaloom/train/run_state.py). The hooks
and the weights reader belong to the layers above the training stack (interop, tune, compress), so they come in
as a factory, `parts(cfg) -> {"weights", "adapt", "quantize"}` (`megaloom.cli.model_parts`), as the policy's own
do. A run without PEFT saved every parameter: its checkpoint alone fills the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaloom.config import Config, ConfigError
from megaloom.precision import autocast

Parts = Callable[[Config], dict]  # a config -> {"weights": ..., "adapt": ..., "quantize": ...}, each may be None


def reward_config(cfg: Config, run: Path) -> Config:
    """The reward run's config in the policy's layout (its parallel section and batch sizes). Its own seed stays:
    it initialised the frozen base of a PEFT run without model.pretrained."""
    from megaloom.config import load_config, read_toml, validate

    if not (run / "config.toml").is_file():
        raise ConfigError(f"rl.reward = '{run}' holds no config.toml; give the run directory of a reward model "
                          "(train.objective = \"reward\")")
    peft = read_toml(run / "config.toml").get("peft", {}).get("method", "none") != "none"
    # a PEFT run's base is still model.pretrained (peft.init only started its adapters); a full run's checkpoint
    # holds every weight, so where they first came from is not read again (it may be gone)
    overrides = ['peft.init=""'] if peft else ['model.pretrained=""']
    try:
        rm_cfg = load_config(run / "config.toml", overrides)
    except (ConfigError, FileNotFoundError) as e:
        raise ConfigError(f"rl.reward = '{run}': its config does not load here: {e}") from None
    if rm_cfg.train.objective != "reward":
        raise ConfigError(f"rl.reward = '{run}' is a run of train.objective = \"{rm_cfg.train.objective}\", not a "
                          "reward model; give a run directory of train.objective = \"reward\"")
    if rm_cfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"rl.reward = '{run}' has model.vocab_size = {rm_cfg.model.vocab_size} but the policy "
                          f"{cfg.model.vocab_size}; train the reward model on the policy's tokenizer")
    rm_cfg.parallel = cfg.parallel
    rm_cfg.train.global_batch, rm_cfg.train.micro_batch = cfg.train.global_batch, cfg.train.micro_batch
    try:  # the reward model in the policy's layout: its layers per stage, its heads per tp rank
        validate(rm_cfg)
    except ConfigError as e:
        raise ConfigError(f"rl.reward = '{run}' does not fit the policy's layout: {e}") from None
    return rm_cfg


def load_reward_model(cfg: Config, trainer: Any, parts: Parts | None) -> Any:
    """The reward model of the run directory `rl.reward` as a frozen `ParallelModel` on the trainer's grid, in the
    policy's layout, in eval mode. Collective: every rank calls it."""
    from megaloom.align.reward import RewardObjective
    from megaloom.train.assemble import build_parallel_model
    from megaloom.train.checkpoint import check_model_keys, find_checkpoint, load, load_peft_run
    from megaloom.train.sharded_state import chunks_of, model_entries

    run = Path(cfg.rl.reward)
    rm_cfg = reward_config(cfg, run)
    if not _same_tokenizer(run / "tokenizer", trainer):
        raise ConfigError(f"rl.reward = '{run}' was trained with another tokenizer than the policy's; train the reward "
                          "model on the policy's tokenizer (data.tokenizer = \"pretrained\" of the same model)")
    method, scheme = rm_cfg.peft.method, rm_cfg.qat.scheme
    if parts is None and (method != "none" or scheme != "none"):
        setting = f"peft.method = '{method}'" if method != "none" else f"qat.scheme = '{scheme}'"
        raise ConfigError(f"rl.reward = '{run}' is a run of {setting}, which needs its hooks to be built; pass "
                          "PPOObjective(cfg, model_parts=megaloom.cli.model_parts) (megaloom train does)")
    made = parts(rm_cfg) if parts is not None else {}
    weights, adapt, quantize = made.get("weights"), made.get("adapt"), made.get("quantize")
    hooks = [h for h in (quantize, adapt, RewardObjective(rm_cfg).adapt_model) if h is not None]
    trained: set[str] = set()  # what the reward run trained, so saved: a PEFT run's adapters and score head

    def build(chunk: nn.Module, tp: Any) -> None:
        for hook in hooks:
            hook(chunk, tp)
        trained.update(name for name, p in chunk.named_parameters() if p.requires_grad)

    pm = build_parallel_model(rm_cfg, trainer.grid, trainer.device, trainable=False, adapt=build)
    group = trainer.checkpointer.group
    ckpt = find_checkpoint(run, share=(trainer.grid.rank, trainer.grid.world_size), gather=trainer.checkpointer.gather)
    if ckpt is None:
        raise ConfigError(f"rl.reward = '{run}' holds no checkpoint; train the reward model first")
    if adapt is not None:  # what the run trained from its checkpoint, the base it was trained on from its source
        ids = {id(p) for chunk in chunks_of(pm.model) for name, p in chunk.named_parameters() if name in trained}
        missing = (f"rl.reward = '{run}': checkpoint {ckpt} holds no adapters although the run's peft.method = "
                   f"'{method}'; give the run directory it was trained in")
        load_peft_run(ckpt, pm.model, lambda p: id(p) in ids, lambda p: id(p) not in ids, adapt, weights, group,
                      missing=missing)
    else:
        state = model_entries(pm.model)
        check_model_keys(ckpt, state, group)
        with torch.no_grad():
            load(ckpt, state, group)
    pm.model.eval()
    return pm


def _same_tokenizer(directory: Path, trainer: Any) -> bool:
    from megaloom.data.sft import files_hash

    return files_hash(directory) == files_hash(Path(trainer.corpus.tokenizer_dir))


@torch.no_grad()
def score(pm: Any, x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor:
    """The reward model's score of each row at its completion's last token (on the last pipeline stage)."""
    from megaloom.align.reward import last_token_positions, row_scores

    position = last_token_positions(y)
    chunks = list(pm.model) if pm.runner is not None else [pm.model]
    head = chunks[-1].score if chunks[-1].last else None

    def fn(lm_head: nn.Module, h: torch.Tensor, prepended: int) -> torch.Tensor:
        return row_scores(head, lm_head, h, position + prepended)

    if pm.runner is None:
        with autocast(precision, x.device):
            out = pm.model(x, y, head_fn=fn)
    else:
        out = pm.runner.forward_outputs([(x, y)], precision, [{"head_fn": fn}] * len(pm.runner.chunks))[0]
    # the last stage's scores; the other stages of a pipeline never read them
    return out.float() if out is not None else torch.zeros(len(x), device=x.device)
