"""The speed levers of rfds-benchmark-step, on the CPU: outputs are copies (a CUDA-graph replay
cannot overwrite a kept output), attributes pass through, FP8 says why it is unavailable."""
import torch

from threestudio_rfds.steptime import levers


class Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.config = {"name": "twice"}

    def forward(self, x):
        return (self.lin(x) * 2,)


def test_graphed_denoiser_returns_copies_equal_to_eager():
    torch.manual_seed(0)
    net = Twice()
    graphed = levers.GraphedDenoiser(net)
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    with torch.no_grad():
        first = graphed(a)[0]
        second = graphed(b)[0]  # a second call at another batch size (RFDS-Rev's B and 2B)
        torch.testing.assert_close(first, net(a)[0])
        torch.testing.assert_close(second, net(b)[0])
    assert graphed.config == {"name": "twice"} and graphed.lin is net.lin


def test_clone_outputs_of_diffusers_style_outputs():
    class Out:
        def __init__(self, sample):
            self.sample = sample

    x = torch.ones(2)
    out = levers._clone_outputs(Out(x))
    assert torch.equal(out.sample, x) and out.sample.data_ptr() != x.data_ptr()


def test_fp8_unavailable_on_cpu_returns_a_reason():
    why = levers.fp8_quantize(Twice())
    assert isinstance(why, str) and why


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert levers.relative_error(ref, ref) == 0.0
    assert abs(levers.relative_error(ref * 1.1, ref) - 0.1) < 1e-6
