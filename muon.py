"""
Muon (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/), as in modded-nanogpt and nanochat: SGD with
Nesterov momentum whose update of each weight matrix is replaced by the nearest semi-orthogonal matrix (U V^T, for
the update's SVD U S V^T). Every direction of the matrix then moves at the same rate, where the raw gradient is
dominated by a few. For the 2-D weights inside the blocks; AdamW keeps the rest (train.py's make_optimizers).

A GPU runs each op as a kernel launch of 5-10 us, and one matrix at a time the default model's step was about
1,150 of them: longer than its compiled forward and backward. So the step is batched, as modded-nanogpt and nanochat
batch it: momentum, decay and the update are foreach ops over every matrix, and the matrices of one shape are
stacked and orthogonalized together, the tall ones transposed to join the wide ones of their size (about 60 ops).
"""
import torch


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0, split=1, ns_dtype=torch.float32):
        # split: a group's weights each hold that many matrices stacked by rows, each orthogonalized on its own
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, split=split))
        self.ns_dtype = ns_dtype  # the Newton-Schulz iteration's precision: bf16 is enough for it (modded-nanogpt)

    @torch.no_grad()
    def step(self):
        matrices = []  # (a weight matrix, its Nesterov update, the step's scale), over every group
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            grads, buffers = [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            updates = torch._foreach_lerp(grads, buffers, group["momentum"])  # Nesterov: the momentum one step ahead
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])  # decoupled, as AdamW's
            for p, update in zip(params, updates):
                shape = (group["split"], -1, p.size(1))
                for weight, u in zip(p.view(shape), update.view(shape)):
                    # a tall matrix's orthogonal update has smaller entries: scaled back up
                    matrices.append((weight, u, -group["lr"] * max(1, weight.size(0) / weight.size(1)) ** 0.5))
        for stack in stacks_by_shape(matrices):
            apply_orthogonalized(stack, self.ns_dtype)


def stacks_by_shape(matrices):
    """The matrices grouped by their shape once the tall ones are turned wide: each group is one batch."""
    stacks = {}
    for matrix in matrices:
        rows, cols = matrix[0].shape
        stacks.setdefault((min(rows, cols), max(rows, cols)), []).append(matrix)
    return stacks.values()


def apply_orthogonalized(stack, ns_dtype):
    """weight += scale x orthogonalize(update) for each (weight, update, scale) of a stack: one Newton-Schulz
    iteration for all of them, the tall ones turned wide."""
    wide = [m for m in stack if m[0].size(0) <= m[0].size(1)]
    tall = [m for m in stack if m[0].size(0) > m[0].size(1)]
    X = orthogonalize(torch.stack([u for _, u, _ in wide] + [u.mT for _, u, _ in tall]).to(ns_dtype)).float()
    # the tall ones turned back in one copy: a foreach op wants each update laid out as its weight
    updates = [*X[:len(wide)].unbind(), *(X[len(wide):].mT.contiguous().unbind() if tall else ())]
    weights, scales = [w for w, _, _ in wide + tall], [scale for _, _, scale in wide + tall]
    torch._foreach_add_(weights, torch._foreach_mul(updates, scales))


def orthogonalize(G, steps=5):
    """
    About U V^T for each G = U S V^T of a batch G (batch, rows, cols): the quintic Newton-Schulz iteration of
    modded-nanogpt, whose coefficients push every singular value into roughly [0.7, 1.2] in five steps, which is
    as good as exact for an update and far cheaper than an SVD.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = G.size(-2) <= G.size(-1)
    X = G if wide else G.mT  # iterate on the small Gram matrix X X^T
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # every singular value <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A, one op
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return X if wide else X.mT
