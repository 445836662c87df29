"""Theorem 5.2 of the SPIN paper on an exactly computable toy policy.

The "model" is a softmax over a finite set of M responses for each of X prompts,
parameterised by logits theta [X, M]; log p_theta(y|x) = log_softmax(theta[x])[y] is
the exact sequence log-prob. The opponent/reference theta_t is the initial policy.

(a) opponent == data (p_theta_t = p_data): y and y' are identically distributed, so the
    expected SPIN gradient at theta = theta_t is exactly 0 (the paper's fixed point);
    the sample mean over many pairs is within a few standard errors of 0, and training
    moves the held-out log-likelihood of data by no more than noise.
(b) opponent != data: the gradient is large and training raises the held-out
    log-likelihood of the real responses.
"""

import math

import pytest
import torch

from spin_mcore.training.loss import LOSS_TYPES, spin_loss

X, M, BETA = 4, 6, 1.0


def _logits(seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(X, M, generator=g, dtype=torch.float64)


DATA_LOGITS = _logits(0)  # p_data
OTHER_LOGITS = _logits(1)  # a different opponent


def _sample(logits, n, gen):
    """n (prompt, response) draws: prompts uniform, responses from softmax(logits[x])."""
    x = torch.randint(0, X, (n,), generator=gen)
    y = torch.multinomial(torch.softmax(logits[x], -1), 1, generator=gen).squeeze(1)
    return x, y


def _pairs(opponent_logits, n, gen):
    """x, y ~ data, y' ~ opponent(.|x)."""
    x, y = _sample(DATA_LOGITS, n, gen)
    y_gen = torch.multinomial(torch.softmax(opponent_logits[x], -1), 1, generator=gen).squeeze(1)
    return x, y, y_gen


def _logp(theta, x, y):
    return torch.log_softmax(theta, -1)[x, y]


def _mean_grad(opponent_logits, loss_type, n, seed):
    """(autograd mean gradient of spin_loss at theta = theta_t [X*M], per-pair closed-form grads [n, X*M])."""
    gen = torch.Generator().manual_seed(seed)
    x, y, y_gen = _pairs(opponent_logits, n, gen)
    theta = opponent_logits.clone().requires_grad_(True)
    ref_real, ref_gen = _logp(opponent_logits, x, y), _logp(opponent_logits, x, y_gen)
    out = spin_loss(_logp(theta, x, y), _logp(theta, x, y_gen), ref_real, ref_gen, beta=BETA, loss_type=loss_type)
    (grad,) = torch.autograd.grad(out.loss, theta)
    # Closed form at t = 0: d l/d theta = l'(0) * beta * (onehot(y) - onehot(y')) in row x; l'(0) = -1/2 for logistic, -1 otherwise.
    dl0 = -0.5 if loss_type == "logistic" else -1.0
    per_pair = torch.zeros(n, X, M, dtype=torch.float64)
    per_pair[torch.arange(n), x, y] += dl0 * BETA
    per_pair[torch.arange(n), x, y_gen] -= dl0 * BETA
    return grad.reshape(-1), per_pair.reshape(n, -1)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_mean_gradient_vanishes_iff_opponent_equals_data(loss_type):
    n = 20000
    grad_a, per_a = _mean_grad(DATA_LOGITS, loss_type, n, seed=10)
    grad_b, _ = _mean_grad(OTHER_LOGITS, loss_type, n, seed=11)
    # The autograd gradient of our loss equals the closed form.
    torch.testing.assert_close(grad_a, per_a.mean(0), rtol=1e-5, atol=1e-8)  # spin_loss computes in fp32
    # ||mean||^2 has expectation sum_j var_j / n under the null; allow 3x that plus slack.
    expected_sq = (per_a.var(0) / n).sum().item()
    assert grad_a.norm().item() ** 2 < 3 * expected_sq, (grad_a.norm().item(), math.sqrt(expected_sq))
    # With the wrong opponent the mean gradient stands far above that noise level.
    assert grad_b.norm().item() > 10 * math.sqrt(expected_sq)
    assert grad_b.norm().item() > 10 * grad_a.norm().item()


def _expected_data_loglik(theta):
    """Exact E_{x, y ~ data}[log p_theta(y|x)] (prompts uniform)."""
    p_data = torch.softmax(DATA_LOGITS, -1)
    return (p_data * torch.log_softmax(theta, -1)).sum(-1).mean().item()


def _train(opponent_logits, steps=150, batch=64, lr=0.5, seed=20):
    """SGD on the SPIN loss from theta = theta_t; returns (held-out LL before, after, exact before, after)."""
    gen = torch.Generator().manual_seed(seed)
    held_x, held_y = _sample(DATA_LOGITS, 4000, torch.Generator().manual_seed(99))
    theta = opponent_logits.clone().requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=lr)
    before = _logp(theta, held_x, held_y).mean().item(), _expected_data_loglik(theta)
    for _ in range(steps):
        x, y, y_gen = _pairs(opponent_logits, batch, gen)
        loss = spin_loss(_logp(theta, x, y), _logp(theta, x, y_gen), _logp(opponent_logits, x, y),
                         _logp(opponent_logits, x, y_gen), beta=BETA).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _logp(theta, held_x, held_y).mean().item(), _expected_data_loglik(theta)
    return before, after


@pytest.fixture
def one_thread():
    """Hundreds of tiny ops: a second intra-op thread only adds contention on a busy CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_moves_loglik_only_when_opponent_differs(one_thread):
    (held_a0, exact_a0), (held_a1, exact_a1) = _train(DATA_LOGITS)
    (held_b0, exact_b0), (held_b1, exact_b1) = _train(OTHER_LOGITS)
    delta_a, delta_b = held_a1 - held_a0, held_b1 - held_b0
    # (a) At p_theta = p_data the data log-likelihood is already maximal: SGD noise only
    # wanders around it (the exact expectation cannot go up).
    assert exact_a1 <= exact_a0 + 1e-12
    assert abs(delta_a) < 0.02, delta_a
    # (b) The main player learns to prefer real responses: their likelihood rises a lot.
    assert delta_b > 0.2, delta_b
    assert exact_b1 - exact_b0 > 0.2
    assert delta_b > 10 * abs(delta_a)
