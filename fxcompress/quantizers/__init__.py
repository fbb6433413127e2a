"""Training-time quantizers (one family a file), used by passes that
simulate low-precision weights and activations in forward with
straight-through gradients: `dorefa` (DoReFa-Net) and `pact` (learned clip)."""
