"""The "cpp" backend: registers the compiled kernels of postembed_fast._C (csrc/) with dispatch.

Layering as in flash-attention: raw extension (_C, raw pointers + sizes + stream)
-> the functions here (argument checks already done by the launchers; this file
passes pointers and shapes) -> the public launchers in this package.
Filled in by the csrc issue; until then nothing is registered and "cpp" reports
itself unimplemented.
"""
