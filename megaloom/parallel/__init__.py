"""Tensor, pipeline and data parallelism: the PTD-P method of Narayanan et al. 2021, §2."""
