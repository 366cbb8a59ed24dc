"""Side-by-side benchmarks of lop-jax against a PyTorch twin written here (docs/speed_vs_pytorch.md).

``benchmarks.torch_twin`` is the twin (the same network, optimiser, augmentation and protocol in
PyTorch), ``benchmarks.step`` times the full-width train step of both in one process,
``benchmarks.protocol`` times whole runs of both as processes, ``benchmarks.profile_run`` breaks
lop-jax's own run down by stage, and ``benchmarks.timing`` holds what the runners share (the
alternation, ratio of medians, the device's name). PyTorch comes from the ``bench`` extra; it is
never a runtime dependency of lop-jax.
"""
