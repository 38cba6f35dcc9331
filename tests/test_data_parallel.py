"""Data-parallel evaluation (celli_scale.distributed.data_parallel) on the suite's fake CPU
devices: sharding the batch over devices changes no number, and the host check of the
step's summary reports non-finite energies."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from celli_scale.datasets import nacl_grid
from celli_scale.distributed import data_parallel as dp
from celli_scale.study.presets import (
    QUICK_HYPERPARAMS,
    QUICK_MODEL_EXTRAS,
    build_potential,
    model_config,
)


@pytest.fixture(scope="module")
def pot():
    return build_potential(
        model_config("allegro", "float64", QUICK_HYPERPARAMS, QUICK_MODEL_EXTRAS)
    )


@pytest.mark.parametrize("devices", [1, 2])
def test_sharded_batch_equals_one_by_one(pot, devices):
    if len(jax.devices()) < devices:
        pytest.skip(f"needs {devices} devices")
    systems = [nacl_grid(2, rattle=0.05, seed=k) for k in range(4)]
    graphs = pot.batch_graph(systems)
    fn, sharding = dp.data_parallel_energy_forces(pot, devices)
    e, f, summary = fn(
        dp.place(pot.params, NamedSharding(sharding.mesh, P())), dp.place(graphs, sharding)
    )
    for k in range(len(systems)):
        graph = jax.tree_util.tree_map(lambda x, k=k: x[k], graphs)
        e_ref, f_ref, _, _ = pot.evaluate(pot.params, graph)
        assert float(e[k]) == pytest.approx(float(e_ref), rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(np.asarray(f[k]), np.asarray(f_ref), rtol=1e-10, atol=1e-12)
    assert float(summary[0]) == pytest.approx(float(np.sum(np.asarray(e))), rel=1e-12)
    assert dp.summary_check(pot, summary) == "ok"


def test_summary_check_reports_non_finite_energies(pot):
    assert dp.summary_check(pot, np.array([1.0, 2.0, 0.0])) == (
        "non-finite energy in 2 structure(s)"
    )


def test_summary_check_judges_the_qeq_residual_by_the_model_tolerance():
    charge_model = types.SimpleNamespace(qeq_tol=1e-6)  # what summary_check reads
    assert dp.summary_check(charge_model, np.array([1.0, 0.0, 1e-6])) == "ok"
    status = dp.summary_check(charge_model, np.array([1.0, 0.0, 1e-3]))
    assert status.startswith("error: charge equilibration did not converge"), status


def test_too_few_devices_is_a_clear_error(pot):
    with pytest.raises(RuntimeError, match="xla_force_host_platform_device_count"):
        dp.batch_mesh(len(jax.devices()) + 1)
