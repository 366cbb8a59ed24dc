"""lop-jax: the class-incremental CIFAR-100 experiment of "Loss of plasticity in deep continual
learning" (Dohare et al., Nature 2024) in JAX/Flax.

Comments and docstrings cite docs/reference_semantics.md, which describes what the reference
experiment does section by section, as "semantics §N"; measurements behind speed decisions are in
docs/performance_notes.md. Errors and exit codes: ``lop_jax.errors``.
"""
