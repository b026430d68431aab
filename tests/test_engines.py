"""Engine detection against the variables each engine sets (as their
documentation lists them), SLURM's compressed node lists, rank -> role, and
the one line a world of the wrong size gets."""
from __future__ import annotations

import pytest

from pipeline.net import engines
from pipeline.wire import protocol
from pipeline.net.engines import Engine, detect

pytestmark = pytest.mark.timeout(30)

# What `mpiexec -n 5` (Open MPI 5) put in rank 2's environment, less the paths.
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "5",
            "OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "5",
            "OMPI_COMM_WORLD_NODE_RANK": "2", "OMPI_UNIVERSE_SIZE": "2",
            "PMIX_RANK": "2", "PMIX_NAMESPACE": "prterun-vm-11532@1"}
# MPICH's Hydra (and Intel MPI).
HYDRA = {"PMI_RANK": "4", "PMI_SIZE": "5", "PMI_FD": "7"}
# srun -n 5 inside `sbatch -N 4`: task 3 (srun(1), OUTPUT ENVIRONMENT VARIABLES).
SLURM = {"SLURM_JOB_ID": "200505", "SLURM_JOBID": "200505", "SLURM_STEP_ID": "0",
         "SLURM_PROCID": "3", "SLURM_LOCALID": "0", "SLURM_NODEID": "2", "SLURM_NTASKS": "5",
         "SLURM_NPROCS": "5", "SLURM_JOB_NODELIST": "gnode[10,20,25,37]",
         "SLURM_STEP_NODELIST": "gnode[10,20,25,37]", "SLURM_NNODES": "4",
         "SLURMD_NODENAME": "gnode25"}
# Pod 1 of the Indexed Job of docs/k8s/dni-job.yaml.
K8S = {"JOB_COMPLETION_INDEX": "1", "HOSTNAME": "dni-1", "DNI_WORLD_SIZE": "5",
       "DNI_SERVICE": "dni", "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
# torchrun --nnodes 5 --nproc-per-node 1: node 4.
TORCHRUN = {"RANK": "4", "WORLD_SIZE": "5", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
            "GROUP_RANK": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env, want", [
    (OPEN_MPI, Engine("mpi", 2, 5)),
    (HYDRA, Engine("mpi", 4, 5)),
    (SLURM, Engine("slurm", 3, 5, ("gnode10", engines.job_port("200505.0")), "200505")),
    (K8S, Engine("k8s", 1, 5, ("dni-0.dni", engines.K8S_PORT), "dni")),
    (TORCHRUN, Engine("env", 4, 5, ("10.0.0.1", 29500))),
    ({"PATH": "/usr/bin", "HOME": "/root"}, engines.LOCAL),
])
def test_each_engine_is_recognised_by_its_own_variables(env, want):
    assert detect(env) == want


def test_mpi_under_slurm_uses_mpi_and_a_forced_launcher_takes_its_own():
    both = {**SLURM, **OPEN_MPI}
    assert detect(both).kind == "mpi"
    assert detect(both, "slurm").kind == "slurm"
    assert detect(both, "local") == engines.LOCAL


def test_a_world_of_one_is_a_local_run_unless_forced():
    alone = {**SLURM, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert detect(alone) == engines.LOCAL      # python launch.py inside an allocation
    assert detect(alone, "slurm").size == 1    # forced: the world check will say why


def test_a_forced_engine_that_is_not_there_says_which_variables_it_missed():
    with pytest.raises(ValueError, match="--launcher: mpi set none of the variables.*OMPI_COMM"):
        detect(TORCHRUN, "mpi")
    with pytest.raises(ValueError, match="not one of"):
        detect({}, "pbs")


@pytest.mark.parametrize("env, message", [
    ({**OPEN_MPI, "OMPI_COMM_WORLD_RANK": "two"}, "OMPI_COMM_WORLD_RANK='two' is not a number"),
    ({**TORCHRUN, "RANK": "5"}, "rank 5 is not below the world size 5"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a port"),
    ({k: v for k, v in K8S.items() if k != "DNI_WORLD_SIZE"}, "needs DNI_WORLD_SIZE"),
    ({**SLURM, "SLURM_STEP_NODELIST": "gnode[10"}, "SLURM node list 'gnode\\[10'"),
])
def test_malformed_variables_are_one_clear_error(env, message):
    with pytest.raises(ValueError, match=message):
        detect(env)


def test_slurm_compressed_node_lists_expand_and_rank_0_is_on_the_first_node():
    assert engines.expand_nodes("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert engines.expand_nodes("a1,b[2-3]") == ["a1", "b2", "b3"]
    env = {**SLURM, "SLURM_STEP_NODELIST": "node[07,01-03]"}
    assert detect(env).rendezvous[0] == "node07"


def test_slurm_ports_differ_between_jobs_and_steps_and_stay_below_the_ephemeral_range():
    ports = {engines.job_port(j) for j in ("200505", "200506", "200505.0", "200505.1")}
    assert len(ports) == 4
    assert all(engines.PORT_BASE <= p < engines.PORT_BASE + engines.PORT_SPAN < 32768
               for p in ports)


def test_the_rendezvous_address_can_be_given():
    assert detect({**TORCHRUN, "DNI_RENDEZVOUS": "head:31000"}).rendezvous == ("head", 31000)
    assert detect({**K8S, "DNI_RENDEZVOUS": "[fd00::1]:31000"}).rendezvous == ("fd00::1", 31000)
    assert detect({**K8S, "DNI_RENDEZVOUS": "head"}).rendezvous == ("head", engines.K8S_PORT)
    assert detect({**K8S, "DNI_PORT": "31001"}).rendezvous == ("dni-0.dni", 31001)


def test_rank_to_role():
    assert [engines.role_of(r, 5) for r in range(5)] == protocol.all_roles(3)
    assert [engines.role_of(r, 6) for r in range(6)] == [
        "coordinator", "source", "layer1", "layer2", "layer3", "output"]
    assert engines.world_size(3) == 5


def test_a_world_of_the_wrong_size_names_both_numbers_in_one_line():
    engines.check_world(5, 3, "mpiexec")
    with pytest.raises(ValueError) as err:
        engines.check_world(6, 3, "mpiexec")
    text = str(err.value)
    assert "\n" not in text and "needs 5 processes" in text and "started 6" in text
    assert "--layers 4" in text


# blame(closed, stopped, now): whom a run's failure names, and when. Closures
# at t=10 (source, stopped from outside by the engine) and t=10.05 (layer2,
# silent); SIGNAL_GRACE_S = 0.1, STOPPED_GRACE_S = 1.
BLAME = [
    ({}, {}, 100.0, None),
    ({"layer2": 10.05}, {}, 10.1, None),                  # a Ctrl-C may yet come
    ({"layer2": 10.05}, {}, 10.16, "layer2"),
    ({"source": 10.0, "layer2": 10.05}, {}, 10.2, "source"),   # both silent: the first
    ({"source": 10.0, "layer2": 10.05}, {"source": "signal 15"}, 10.1, None),
    ({"source": 10.0, "layer2": 10.05}, {"source": "signal 15"}, 10.16, "layer2"),
    # every closure stopped from outside: the first, once a second has passed
    ({"source": 10.0}, {"source": "signal 15"}, 10.9, None),
    ({"source": 10.0}, {"source": "signal 15"}, 11.0, "source"),
    ({"layer2": 10.05, "source": 10.0}, {"source": "signal 15", "layer2": "signal 15"},
     11.0, "source"),
    # the source's stop explained (the coordinator's engine process went too)
    ({"source": 10.0, "layer2": 10.05}, {"source": "signal 15", "layer2": "signal 15"},
     11.0, "layer2", {"source"}),
    ({"source": 10.0}, {"source": "signal 15"}, 11.0, "source", {"source"}),
    ({"source": 10.0, "layer2": 10.9}, {"source": "signal 15"}, 11.0, None),
    ({"source": 10.0, "layer2": 10.9}, {"source": "signal 15"}, 11.05, "layer2"),
]  # rows: closed, stopped, now, want[, explained]


@pytest.mark.parametrize("closed, stopped, now, want, explained",
                         [(*row, frozenset()) if len(row) == 4 else row for row in BLAME])
def test_blame_names_the_first_silent_closure_before_any_rank_stopped_from_outside(
        closed, stopped, now, want, explained):
    from pipeline.coord.blame import blame
    assert blame(closed, stopped, now, explained) == want
