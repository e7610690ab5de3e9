"""torch.compile(fullgraph=True) for every layer of the family, against eager.

Compiling costs ~20-50 s per model on this project's CI machines, so all layers go through one
module: one inductor compile covers each layer's training forward, backward and running-statistics
update (and inference through FrozenBatchNorm, which is eval-mode batch norm). The eval-mode graph
of the other layers is captured with fullgraph=True too, on the aot_eager backend, which traces
the same graph (Dynamo, AOTAutograd, the custom ops' fake implementations) without paying for a
second inductor compile.
"""

import copy

import torch

import batchnorm


class EveryLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.act = batchnorm.BatchNormAct2d(3, act="silu")
        self.renorm = batchnorm.BatchRenorm2d(3, rmax=1.5, dmax=0.5, rmax_ramp=(0, 4),
                                              dmax_ramp=None)
        self.ghost = batchnorm.GhostBatchNorm2d(3, virtual_batch_size=3)
        self.frozen = batchnorm.FrozenBatchNorm2d(3, act="relu")
        self.masked = batchnorm.MaskedBatchNorm2d(3)
        self.domain = batchnorm.DomainBatchNorm2d(3, 2, shared_affine=False)

    def forward(self, x, mask, domain):
        h = self.act(x, x)
        h = self.renorm(h)
        h = self.ghost(h)
        h = self.frozen(h)
        h = self.masked(h, mask)
        return self.domain(h, domain)


def test_compile_fullgraph_matches_eager_for_every_layer():
    torch.manual_seed(0)
    eager = EveryLayer()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    for step in range(2):
        x = torch.randn(7, 3, 4, 4) * 2 + 1
        mask = torch.rand(7, 4, 4) > 0.3
        domain = torch.tensor(step % 2)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = eager(x1, mask, domain), compiled(x2, mask, domain)
        torch.testing.assert_close(y2, y1)
        # Not y.square().sum(): through the last batch norm that is a constant, so every earlier
        # gradient would be rounding noise, equal only where eager and compiled run the same
        # kernels (small eager batches run aten's, kernels.small).
        dy = torch.randn_like(y1)
        y1.backward(dy)
        y2.backward(dy)
        torch.testing.assert_close(x2.grad, x1.grad)
        for (name, p1), p2 in zip(eager.named_parameters(), compiled_module.parameters()):
            torch.testing.assert_close(p2.grad, p1.grad, msg=name)
        for (name, b1), b2 in zip(eager.named_buffers(), compiled_module.buffers()):
            torch.testing.assert_close(b2, b1, msg=name)
    eager.eval()
    compiled_eval = torch.compile(compiled_module.eval(), fullgraph=True, backend="aot_eager")
    x, mask = torch.randn(5, 3, 4, 4), torch.rand(5, 4, 4) > 0.3
    torch.testing.assert_close(compiled_eval(x, mask, torch.tensor(1)),
                               eager(x, mask, torch.tensor(1)))
