import numpy as np
import torch

from pipelines.physics.ivim import EPSTEIN_B_VALUES, ivim_signal


def test_ivim_closed_form_and_limits():
    b = torch.tensor(EPSTEIN_B_VALUES, dtype=torch.float64)
    s0, f, d, ds = (torch.tensor([v], dtype=torch.float64) for v in (1.5, 0.2, 1.2e-3, 30e-3))
    s = ivim_signal(b, s0, f, d, ds)[0].numpy()
    ref = 1.5 * (0.2 * np.exp(-b.numpy() * 30e-3) + 0.8 * np.exp(-b.numpy() * 1.2e-3))
    np.testing.assert_allclose(s, ref, rtol=1e-12)
    assert s[0] == 1.5  # b = 0 gives S0
    # f = 0: mono-exponential in D.
    s_mono = ivim_signal(b, s0, torch.zeros(1, dtype=torch.float64), d, ds)[0].numpy()
    np.testing.assert_allclose(np.log(s_mono / 1.5), -b.numpy() * 1.2e-3, rtol=1e-10)


def test_ivim_gradients():
    params = [torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in (1.0, 0.1, 1e-3, 20e-3)]
    b = torch.tensor(EPSTEIN_B_VALUES, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *p: ivim_signal(b, *p), params)
