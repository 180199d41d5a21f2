"""Parameter-efficient fine-tuning: the base model frozen, only a method's own parameters trained,
checkpointed and exported as PEFT adapters (docs/finetuning.md).

The contract every method module follows (lora.py/dora.py here; ia3.py, prompt.py, adapter.py):

- `megaloom.tune.peft.apply_peft(chunk, cfg, tp)` is called on each model chunk (a
  `megaloom.model.transformer.Transformer`, possibly one pipeline stage, already tensor-parallelised by
  `parallelize_tensor`, its base parameters initialised or filled from `model.pretrained`) before
  FSDP/ZeRO wrapping and optimizer creation. It freezes every base parameter (`requires_grad = False`)
  and calls the method module's `apply(chunk, cfg, tp)`.
- `apply(chunk: Transformer, cfg: Config, tp: TPGroup | None) -> None` inserts the method's trainable
  modules/parameters (requires_grad True, fp32 like the base parameters before mixed precision) and
  initialises them deterministically from `cfg.train.seed` and the parameter's canonical name (use
  `megaloom.tune.peft.seeded(seed, name, shape)`), so that the same seed gives the same full adapters in
  every (t, p) layout. A tp-split parameter carries `param.shard_spec = ShardSpec(...)` (full shape, dim,
  blocks, rank, size; as `parallel/tensor.py` does) and holds `spec.take(full)`
  (`megaloom.tune.peft.place(param, full)` does both, also under ZeRO-2/3). A parameter every tp rank
  holds whole has no `shard_spec`: its gradient must then be the same on every tp rank without further
  communication (compute it from replicated activations, or put the tp collective in the forward as
  LoRA does); under sequence parallelism the trainer sums the gradients of parameters without a
  shard_spec over tp (`megaloom/parallel/tensor.py sync_replicated_grads`), as for norms.
  `apply_peft` marks every parameter left trainable `param.adapter = True`: the inference loader
  (`megaloom/interop/load.py`) tells adapters from the base by it; the trainer by requires_grad.
  Parameter names: under the module they adapt, e.g. `layers.3.attn.qkv.lora.pairs.q_proj.A`; whatever the
  method chooses, they must be the same in every layout (layout-independent checkpoints).
- `peft_names(chunk: Transformer) -> dict[str, tuple[str, ShardSpec | None]]`: for each of the method's
  megaloom parameter names in this chunk, the PEFT checkpoint key as `get_peft_model_state_dict` writes
  it (e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; no adapter name) and the
  parameter's ShardSpec (None = held whole). The export (`megaloom convert RUN OUT --to peft`), the import
  (`peft.init`) and the checkpoints use it; tensors are exchanged in PEFT's own orientation/shape (the
  method transposes in `peft_names`' consumers only through `to_peft`/`from_peft` below if it needs to).
- optional `to_peft(name, full) -> Tensor` and `from_peft(name, tensor, cfg) -> Tensor`: the full megaloom
  tensor to PEFT's tensor and back (default: identity), for methods whose layout differs from PEFT's.
  Several parameters may share one PEFT key (prefix tuning: each layer's prefix is a slice of PEFT's one
  `prompt_embeddings`): `from_peft` then cuts the parameter's part out of the PEFT tensor, and the
  optional `to_peft_tensors(full: dict[name, Tensor], cfg) -> dict[key, Tensor]` builds the PEFT tensors
  from all of them at once (the export uses it instead of `to_peft`).
- optional `peft_config(cfg: Config) -> dict`: the method's keys of `adapter_config.json`.
- optional `merge(chunk) -> None`: fold the adapters into the base weights (`--to hf --merge`).
- optional `from_base(chunk, cfg) -> None`: initialisation that needs the base's final (pretrained)
  weights, run once they are filled and before peft.init is read (DoRA's magnitudes). Under ZeRO-2/3 the
  parameters are FSDP2's DTensors (dp parts along dim 0): `megaloom.tune.peft.whole` gathers one (a
  collective over dp), `place_local` writes a rank's part of a whole tp shard.
- a method must not change the base parameters' names (pretrained weights and layout-independent
  checkpoints find them by name): add submodules, or register forward (pre-)hooks on existing ones.

Files: peft.py (the framework, the `PeftHook` callback, PEFT adapter files), lora.py (LoRA and DoRA),
qlora.py (the NF4 base), export.py (`megaloom convert --to peft`, `--to hf --merge`).

Train never imports tune: the cli passes `megaloom.tune.peft.PeftHook(cfg)` down as a callback
(`adapt=` of `build_parallel_model`, `setup_training`, `Trainer`).
"""
