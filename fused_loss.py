"""
The CPU's fast path for the head and the loss: mean(cross_entropy(x @ w.T, targets)) without ever holding all the
logits. model.py uses it where a loss is asked for without the logits on a CPU, run eagerly (fused_loss_pays); on
a GPU the compiled plain loss is as fast. bench.py train compares the two.
"""
import torch

CHUNK_ROWS = 512  # rows of logits held at once: the fastest of 128 to 2048 with a 4,096-token head


def fused_cross_entropy(x, w, targets):
    """mean(cross_entropy(x @ w.T, targets)) for x (N, C), w (V, C), targets (N,); gradients only when enabled."""
    return FusedLinearCrossEntropy.apply(x, w, targets, torch.is_grad_enabled())


class FusedLinearCrossEntropy(torch.autograd.Function):
    """
    The loss is the last node of the graph, so its gradients are known during the forward pass: take the rows in
    chunks, compute each chunk's logits, log-sum-exp and softmax - onehot in place, and accumulate dx and dw right
    away; backward only scales them. That saves several passes over the logits a step.
    """

    @staticmethod
    def forward(ctx, x, w, targets, with_grad):
        n, rows = x.size(0), min(CHUNK_ROWS, x.size(0))
        # Under bf16 autocast the three matmuls take bf16, as autocast would give the head; the softmax stays float32
        low = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        xl, wl = x.to(low), w.to(low)  # no copies in float32
        dx, dw = (torch.empty_like(xl), torch.empty_like(w)) if with_grad else (None, None)  # dw sums in float32
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        buf = x.new_empty(rows, w.size(0), dtype=torch.float32)  # one chunk's logits, reused: no big allocations
        products = buf if low == torch.float32 else x.new_empty(buf.shape, dtype=low)  # where the matmul writes them
        for i in range(0, n, CHUNK_ROWS):
            xc, tc = xl[i:i + CHUNK_ROWS], targets[i:i + CHUNK_ROWS]
            logits = buf[:len(tc)]
            logits.copy_(torch.mm(xc, wl.t(), out=products[:len(tc)]))  # a copy only in bf16
            target_logit = logits.gather(1, tc[:, None])
            top = logits.amax(dim=1, keepdim=True)
            total = logits.sub_(top).exp_().sum(dim=1, keepdim=True)  # logits now hold exp(logit - max)
            loss += (top + total.log() - target_logit).sum()
            if with_grad:  # d loss / d logits = (softmax - onehot(target)) / n, in one pass over the logits
                grad = logits.mul_((total * n).reciprocal_())
                grad[torch.arange(len(tc)), tc] -= 1.0 / n
                grad = grad.to(low)
                torch.mm(grad, wl, out=dx[i:i + CHUNK_ROWS])
                if i == 0:
                    dw.copy_(torch.mm(grad.t(), xc))
                else:
                    dw.add_(torch.mm(grad.t(), xc))
        if with_grad:
            ctx.save_for_backward(dx.to(x.dtype), dw)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        dx, dw = ctx.saved_tensors
        return dx * grad_loss, dw * grad_loss, None, None
