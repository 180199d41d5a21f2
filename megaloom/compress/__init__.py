"""Compression of trained models (docs/compression.md): post-training quantization and pruning.

- schemes.py   the quantization schemes (method, group size) as torchao configs; shared with QAT
- quantize.py  round-to-nearest quantization of a model in any tensor-parallel layout (torchao), and
               GPTQ results packed into the same torchao int4 tensors
- hessian.py   calibration windows and the block-by-block pass that collects each linear's X^T X
- gptq.py      GPTQ (Frantar et al. 2022) of one layer, written here
- prune.py     magnitude, Wanda and SparseGPT (Frantar and Alistarh 2023) masks, N:M patterns
- store.py     the on-disk formats: quantized checkpoints and pruning masks, loaded in any layout
- command.py   `megaloom quantize` and `megaloom prune`
- distill.py   train.objective = "distill": the frozen teacher on the student's grid, the student from
               teacher layers
- distill_loss.py  the chunked, vocab-parallel forward/reverse KL and generalised JSD against the teacher

Above train (it builds models through interop and train.assemble), below cli. The trainer never imports
this package: `train.keep_sparsity` reaches it as a step hook the command line passes down.
"""
