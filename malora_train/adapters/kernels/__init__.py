"""The adapters' fast path, one module per operation: its Triton kernels, their launchers and its autograd
Function (a hand-written backward that keeps only x and a bit mask of the activations) together.

    projection   z = D dropout(x) and the router logits W_g x      (full-size input, tiny output)
    gated_up     y = out + s (gates * expand(z)) B^T                (tiny input, full-size output)
    routing      softmax, top-K and renormalisation, with the auxiliary losses' statistics

On CUDA with Triton the Functions run the kernels; elsewhere (the CPU, CI, a kernel that failed to build)
they run plain torch ops, which the float64 equation tests check. ``common`` holds what the operations
share, among it ``KernelState``: the model's choice between the two paths and its device-side dropout seed.
"""
