"""
Muon (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/), as in modded-nanogpt and nanochat: SGD with
Nesterov momentum whose update of each weight matrix is replaced by the nearest semi-orthogonal matrix (U V^T, for
the update's SVD U S V^T). Every direction of the matrix then moves at the same rate, where the raw gradient is
dominated by a few. For the 2-D weights inside the blocks; AdamW keeps the rest (train.py's make_optimizers).
"""
import torch


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0, split=1, ns_dtype=torch.float32):
        # split: a group's weights each hold that many matrices stacked by rows, each orthogonalized on its own
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, split=split))
        self.ns_dtype = ns_dtype  # the Newton-Schulz iteration's precision: bf16 is enough for it (modded-nanogpt)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov: the momentum one step ahead
                update = update.to(self.ns_dtype)
                if group["split"] > 1:
                    update = orthogonalize(update.view(group["split"], -1, p.size(1))).view_as(p)
                else:  # a tall matrix's orthogonal update has smaller entries: scale it back up
                    update = orthogonalize(update) * max(1, p.size(0) / p.size(1)) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, as AdamW's
                p.add_(update, alpha=-group["lr"])


def orthogonalize(G, steps=5):
    """
    About U V^T for G = U S V^T (also for a batch of matrices): the quintic Newton-Schulz iteration of
    modded-nanogpt, whose coefficients push every singular value into roughly [0.7, 1.2] in five steps, which is
    as good as exact for an update and far cheaper than an SVD.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = G.size(-2) <= G.size(-1)
    X = G if wide else G.mT  # iterate on the small Gram matrix X X^T
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # every singular value <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT
