"""cnnjax.runtime: the jit every model program compiles through, and its CPU options."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnnjax import runtime
from cnnjax.models import fastconv

DN = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))


def ynn_convolutions(compiled_text: str) -> int:
    """How many of a compiled CPU module's YNNPACK fusions hold a convolution."""
    bodies, name = {}, None
    for line in compiled_text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name = line.split()[0].lstrip("%")
            bodies[name] = ""
        elif name:
            bodies[name] += line
    calls = [line.split("calls=%")[1].split(",")[0].split()[0]
             for line in compiled_text.splitlines() if "ynn_fusion" in line and "calls=%" in line]
    return sum(" convolution(" in bodies.get(c, "") for c in calls)


def test_full_convolutions_compile_to_xla_kernels_not_ynnpack_on_the_cpu():
    """Under "auto", `runtime.jit` compiles a full 3x3 convolution and its gradients with
    XLA's own CPU kernels (jaxlib 0.10 gives them to YNNPACK by default, slower here), with the
    same values; under "xla" XLA's default stands; a caller's own options are kept."""
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 32))
    k = jax.random.normal(jax.random.key(1), (3, 3, 32, 48)) * 0.1

    def f(x, k):
        y, vjp = jax.vjp(lambda x, k: fastconv.conv_general_dilated(
            x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN), x, k)
        return (y, *vjp(jnp.cos(y)))

    assert runtime.compiler_options() == runtime.CPU_COMPILER_OPTIONS
    results, counts = {}, {}
    for impl in ("auto", "xla"):
        with fastconv.impl(impl):
            step = runtime.jit(lambda x, k: f(x, k))
            text = step.lower(x, k).compile().as_text()
            counts[impl] = (ynn_convolutions(text), text.count(" convolution("))
            results[impl] = step(x, k)
    assert counts["auto"][0] == 0 and counts["auto"][1] == 3, counts  # forward, both gradients
    assert counts["xla"][0] == 3, counts
    for a, b in zip(results["auto"], results["xla"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(b))))
    with fastconv.impl("xla"):
        assert runtime.compiler_options() == {}
    mine = runtime.jit(lambda x, k: f(x, k), compiler_options={"xla_cpu_enable_fast_math": False})
    assert ynn_convolutions(mine.lower(x, k).compile().as_text()) == 0


def test_compiler_options_a_jaxlib_does_not_know_are_left_out(monkeypatch):
    monkeypatch.setattr(runtime, "CPU_COMPILER_OPTIONS",
                        {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NO_SUCH"})
    runtime._options_known.cache_clear()
    try:
        assert runtime.compiler_options() == {}
        assert runtime.jit(lambda x: x * 2)(jnp.float32(3)) == 6
    finally:
        runtime._options_known.cache_clear()


def test_jit_on_places_the_program_on_its_device_and_compiles_it_fast_on_the_cpu():
    device = jax.devices()[-1]
    f = runtime.jit_on(device, lambda x: x * 2)
    y = f(jax.device_put(jnp.arange(3.0), device))
    assert y.devices() == {device}
    np.testing.assert_array_equal(y, [0.0, 2.0, 4.0])
    text = f.lower(jnp.arange(3.0)).compile().as_text()
    assert text  # compiles with FAST_CPU_COMPILE's options accepted by this jaxlib
