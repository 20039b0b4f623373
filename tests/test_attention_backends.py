"""Every registered attention backend equals the eager reference: a new backend is tested by being registered.

Each runs on the same cases (non-square grids, the profiles of the pooled-query training shortcut, models with and
without the Gaussian): outputs and every gradient, float32 tightly, bfloat16 within twice the reference's own
bfloat16 error. A backend that cannot run here (e.g. CUDA's on a CPU machine) is skipped with its reason."""

import copy

import pytest
import torch

import locatvit_hf.attention_locatvit as attention
from locatvit_hf import LocAtViTForImageClassification, LocAtViTForSemanticSegmentation

from .conftest import assert_same_training_step, compile_recording_graphs, tiny_config

BACKENDS = sorted(attention.BACKENDS)


def attention_inputs(grid, dtype=torch.float32, batch=2, heads=2, dim=8, seed=0):
    """Queries, keys and values (batch, heads, N, dim) and trained-like profiles of a grid, needing gradients."""
    generator = torch.Generator().manual_seed(seed)
    height, width = grid
    seq_len = 1 + height * width
    qkv = [torch.randn(batch, heads, seq_len, dim, generator=generator) for _ in "qkv"]
    row = torch.rand(batch, heads, height * width, height, generator=generator) * 2
    col = torch.rand(batch, heads, height * width, width, generator=generator)
    return [t.to(dtype).requires_grad_() for t in qkv] + [row.requires_grad_(), col.requires_grad_()]


def run(name, inputs, workspace=None):
    """A backend's output (batch, N, heads, dim) and the gradients of a fixed random projection of it."""
    query, key, value, row, col = inputs
    output, _ = attention.BACKENDS[name](
        query, key, value, (row, col), scale=0.35, dropout=0.0, num_prefix=1, workspace=workspace
    )
    weight = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((output.float() * weight).sum(), inputs)
    return output.detach(), grads


def skip_if_unavailable(name, inputs):
    problem = attention.backend_unavailable(name, inputs[0], inputs[3:], 0.0)
    if problem:
        pytest.skip(problem)


@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (1, 6)], ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_equals_eager_in_float32(name, grid):
    inputs = attention_inputs(grid)
    skip_if_unavailable(name, inputs)
    expected_output, expected_grads = run("eager", inputs)
    output, grads = run(name, inputs, attention.BiasWorkspace())
    torch.testing.assert_close(output, expected_output, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_in_bfloat16_is_as_close_as_the_reference(name):
    """Against float64, a backend's bfloat16 error is at most twice (plus rounding) the eager reference's own."""
    inputs = attention_inputs((3, 4), torch.bfloat16)
    skip_if_unavailable(name, inputs)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    exact_output, exact_grads = run("eager", exact)
    reference_output, reference_grads = run("eager", inputs)
    output, grads = run(name, inputs, attention.BiasWorkspace())

    def error(actual, expected):
        return (actual.double() - expected).abs().max().item()

    assert error(output, exact_output) <= 2 * error(reference_output, exact_output) + 1e-2
    for grad, reference, exact_grad in zip(grads, reference_grads, exact_grads):
        assert error(grad, exact_grad) <= 2 * error(reference, exact_grad) + 1e-2


@pytest.mark.parametrize(
    "model_class, overrides, pixels",
    [
        (LocAtViTForSemanticSegmentation, {}, (40, 24)),  # non-square grid, not the configured one
        (LocAtViTForImageClassification, {"image_size": 256, "patch_size": 8}, (48, 40)),  # pooled queries
        (LocAtViTForImageClassification, {"use_gaussian_attention": False}, (32, 32)),  # plain ViT
    ],
    ids=["non-square", "pooled", "no-gaussian"],
)
@pytest.mark.parametrize("name", BACKENDS)
def test_model_training_step_equals_eager(name, model_class, overrides, pixels):
    """A training step of a model whose every layer is forced onto the backend: same loss and parameter gradients
    as the eager reference; a forward hook on the Gaussian module fires in every layer, once more in backward on
    the backends that recompute the profiles there. In float64, so that the gradients that are zero in exact
    arithmetic (the key bias's) are zero to rounding."""
    config = tiny_config(**overrides)
    torch.manual_seed(0)
    reference = model_class._from_config(copy.deepcopy(config), attn_implementation="eager").double().train()
    probe = reference.locatvit.encoder.layers[0].attention
    inputs = attention_inputs((2, 2), torch.float64, dim=config.head_dim)
    profiles = inputs[3:] if config.use_gaussian_attention else None
    if name != "eager" and (problem := attention.backend_unavailable(name, inputs[0], profiles, 0.0)):
        pytest.skip(problem)
    model = model_class._from_config(tiny_config(**overrides, attention_backend=name)).double().train()
    model.load_state_dict(reference.state_dict())
    calls = []
    for layer in model.locatvit.encoder.layers:
        if layer.attention.gaussian_bias is not None:
            layer.attention.gaussian_bias.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 3, *pixels, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, *pixels) if model_class is LocAtViTForSemanticSegmentation else (2,))
    assert_same_training_step(model, reference, x, labels)
    passes = 2 if name in attention.PROFILES_RECOMPUTED else 1
    assert len(calls) == (passes * config.num_hidden_layers if probe.gaussian_bias is not None else 0)


def test_forced_backend_that_cannot_run_says_why():
    model = LocAtViTForImageClassification(tiny_config(attention_backend="cuda_chunked"))
    with pytest.raises(ValueError, match="attention_backend='cuda_chunked'.*CUDA tensors"):
        model(torch.randn(1, 3, 32, 32))
    model = LocAtViTForImageClassification(tiny_config(attention_backend="flash"))
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        model(torch.randn(1, 3, 32, 32))


def test_selection_table():
    """The automatic choice: eager when asked for, the fused CPU kernel for float32 CPU calls where it is built, sdpa
    for other dtypes, with attention dropout, without the Gaussian, and under export."""
    query = torch.randn(1, 2, 5, 8)
    profiles = (torch.rand(1, 2, 4, 2), torch.rand(1, 2, 4, 2))

    def select(**overrides):
        arguments = {"implementation": "sdpa", "forced": None, "dropout": 0.0, **overrides}
        return attention.select_backend(
            arguments.pop("query", query), arguments.pop("profiles", profiles), **arguments
        )

    fused = "cpu_fused" if attention.fused_cpu_attention() is not None else "sdpa"
    assert select() == fused
    assert select(implementation="eager") == "eager"
    assert select(query=query.bfloat16()) == "sdpa"
    assert select(dropout=0.1) == "sdpa"
    assert select(profiles=None) == "sdpa"
    assert select(forced="eager") == "eager"
    # Training (queries that need a gradient): where no kernel runs, `blocked` keeps a ViT's memory.
    training = query.clone().requires_grad_()
    assert select(query=training) == ("cpu_fused" if fused == "cpu_fused" else "blocked")
    assert select(query=training.bfloat16()) == "blocked"
    assert select(query=training.bfloat16(), dropout=0.1) == "sdpa"
    assert select(query=training.bfloat16(), profiles=None) == "sdpa"
    with torch.no_grad():
        assert select(query=training.bfloat16()) == "sdpa"


def test_blocked_backend_across_query_blocks(monkeypatch):
    """`blocked` with blocks of 3 queries (the CLS query and the patch queries split across blocks, a last short
    block): the eager reference's output and gradients in float64."""
    inputs = [t.detach().double().requires_grad_() for t in attention_inputs((3, 5))]
    expected_output, expected_grads = run("eager", inputs)
    monkeypatch.setattr(attention, "BLOCKED_SCORES_BYTES", 2 * 2 * 16 * 4 * 3)
    assert [block.stop - block.start for block in attention.query_blocks(inputs[0])] == [3, 3, 3, 3, 3, 1]
    output, grads = run("blocked", inputs)
    torch.testing.assert_close(output, expected_output, rtol=1e-12, atol=1e-12)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_blocked_backend_under_bfloat16_autocast(monkeypatch):
    """A training step under CPU bfloat16 autocast (where the automatic choice takes `blocked`), against the same
    model on the eager reference: the loss and every gradient within bfloat16's resolution."""
    config = tiny_config(qkv_bias=False)  # the keys' bias: a zero gradient but for rounding, in bfloat16 large
    model = LocAtViTForImageClassification(config).train()
    reference = LocAtViTForImageClassification._from_config(copy.deepcopy(config), attn_implementation="eager")
    reference.load_state_dict(model.state_dict())
    pixel_values, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    chosen, original = [], attention.BACKENDS["blocked"]
    monkeypatch.setitem(attention.BACKENDS, "blocked", lambda *args, **kw: chosen.append(1) or original(*args, **kw))
    losses = []
    for each in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = each(pixel_values, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    assert len(chosen) == model.config.num_hidden_layers
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=0)
    references = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        expected = references[name].grad
        assert (parameter.grad - expected).norm() <= 5e-2 * expected.norm() + 1e-6, name


@pytest.mark.parametrize("name, keeps_scores", [("blocked", False), ("sdpa", True)])
def test_what_training_keeps_for_backward(name, keeps_scores):
    """Saved for backward by one attention call in training: `blocked` keeps nothing with an entry per score (its
    inputs, output and one log-sum-exp per query); `sdpa` with a mask that needs a gradient does."""
    inputs = attention_inputs((6, 6), batch=2, heads=2, dim=8)
    seq_len = inputs[0].shape[2]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor
    ):
        attention.BACKENDS[name](*inputs[:3], tuple(inputs[3:]), scale=0.35, dropout=0.0, num_prefix=1)
    assert saved
    per_score = [tensor for tensor in saved if tensor.numel() >= 2 * 2 * seq_len * seq_len]
    assert bool(per_score) == keeps_scores, [tuple(tensor.shape) for tensor in saved]


def test_compiled_model_keeps_the_fused_operator():
    """`torch.compile(fullgraph=True)` of a training step traces the fused CPU kernel as operators in its forward
    and backward graphs (not dropped for another path), with the eager model's loss and gradients."""
    if attention.fused_cpu_attention() is None:
        pytest.skip("the fused CPU kernel is not built here")
    model = LocAtViTForImageClassification(tiny_config()).train()
    compiled, graphs = compile_recording_graphs(model)
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    compiled(x, labels=labels).loss.backward()
    forward, backward = graphs
    assert "locatvit.gaussian_attention.default" in forward and "locatvit.gaussian_profiles.default" in forward
    assert "locatvit.gaussian_attention_backward.default" in backward
    compiled_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(x, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], parameter.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", BACKENDS)
def test_backends_keep_what_backward_needs_when_only_keys_and_values_train(name, monkeypatch):
    """The first layer's queries without a gradient (the embeddings and all of the first layer but its key and value
    projections frozen) while its keys and values train: the backward still needs that layer's bias, so no backend
    may write it into a buffer that is written again (by another layer, or by the next block of queries of the
    blockwise inference path, which a one-byte threshold turns on for every call)."""
    monkeypatch.setattr(attention, "INFERENCE_BIAS_BYTES", 1)
    config = tiny_config(image_size=(32, 48), num_hidden_layers=3)
    model = LocAtViTForImageClassification(config).train()
    model.locatvit.embeddings.requires_grad_(False)
    first = model.locatvit.encoder.layers[0]
    first.requires_grad_(False)
    first.attention.k_proj.requires_grad_(True)
    first.attention.v_proj.requires_grad_(True)
    reference = copy.deepcopy(model)
    reference.config.attention_backend = "eager"
    model.config.attention_backend = name
    pixel_values = torch.randn(2, 3, 32, 48)
    queries = torch.zeros(2, config.num_attention_heads, 1 + 4 * 6, config.hidden_size // config.num_attention_heads)
    problem = attention.backend_unavailable(name, queries, (queries,), 0.0)
    if problem:
        pytest.skip(problem)
    for current in (reference, model):
        current(pixel_values, labels=torch.tensor([0, 1])).loss.backward()
    for (key, parameter), expected in zip(model.named_parameters(), reference.parameters()):
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=key)
