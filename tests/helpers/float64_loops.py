"""Reference computations by explicit loops, independent of the code under test."""
import torch


def loop_dot(a, b):
    """Dot product of two 1-D sequences by an explicit loop (works on floats or 0-d tensors)."""
    total = 0.0
    for d in range(len(a)):
        total = total + a[d] * b[d]
    return total


def loop_logsumexp(values):
    """log(sum(exp(v))) by an explicit loop, stabilised by the maximum."""
    top = max(float(torch.as_tensor(v).detach()) for v in values)
    total = 0.0
    for v in values:
        total = total + torch.exp(torch.as_tensor(v, dtype=torch.float64) - top)
    return top + torch.log(torch.as_tensor(total, dtype=torch.float64))
