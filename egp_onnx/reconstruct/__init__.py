"""Layer-wise refit by least squares after a pruning step: im2col rows, normal equations, solves."""
