import torch

from arr_coc.balancing import TensionBalancer, standardize


def three_scores(n: int = 10) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(n, generator=generator) for _ in range(3)]


def test_standardize():
    z = standardize(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert abs(float(z.mean())) < 1e-6 and abs(float(z.std(unbiased=False)) - 1) < 1e-4
    assert torch.equal(standardize(torch.full((5,), 3.0)), torch.zeros(5))
    assert torch.equal(standardize(torch.tensor([4.0])), torch.zeros(1))


def test_weights_sum_to_one_and_depend_on_the_query():
    torch.manual_seed(0)
    balancer = TensionBalancer(query_dim=16)
    first, second = balancer.weights(torch.randn(16)), balancer.weights(torch.randn(16))
    for weights in (first, second):
        assert weights.shape == (3,) and weights.min() >= 0
        assert abs(weights.detach().sum().item() - 1.0) < 1e-6
    assert not torch.allclose(first, second)


def test_combined_is_weighted_standardized_scores():
    torch.manual_seed(0)
    balancer = TensionBalancer(query_dim=8)
    query = torch.randn(8)
    scores = three_scores()
    weights, combined = balancer(query, *scores)
    expected = sum(w * standardize(s) for w, s in zip(weights, scores))
    assert combined.shape == (10,) and torch.allclose(combined, expected, atol=1e-6)
    # A scorer cannot dominate by scale: rescaling and shifting one leaves the mix unchanged.
    _, rescaled = balancer(query, 1000.0 * scores[0] + 5.0, scores[1], scores[2])
    assert torch.allclose(rescaled, combined, atol=1e-4)


def test_balancer_is_trainable_from_the_combined_score():
    torch.manual_seed(0)
    balancer = TensionBalancer(query_dim=8)
    scores = three_scores()
    _, combined = balancer(torch.randn(8), *scores)
    (combined * torch.randn(10)).sum().backward()
    assert balancer.head.weight.grad.abs().sum() > 0 and balancer.head.bias.grad.abs().sum() > 0
