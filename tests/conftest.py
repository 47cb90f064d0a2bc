"""Shared fixtures: the committed real-post sample, sentence-transformers on the default
model, and small randomly initialized models of other shapes saved as local folders."""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch  # importing torch does not import triton, so TRITON_INTERPRET below still takes effect

# `python -m pytest` from the repo root puts the source tree first on sys.path, where
# postembed_fast has neither the compiled _C nor kernels/ inside it (the wheel maps
# kernels/ to postembed_fast.kernels). Test the installed package instead.
_ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing here may reach a hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # read once at huggingface_hub's import (tests/test_clients.py)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HAS_CUDA = torch.cuda.is_available()  # does not initialize CUDA
if not HAS_CUDA:
    # Without a GPU the Triton kernel tests run under the interpreter, which triton.jit picks when a
    # kernel is decorated, i.e. when postembed_fast.kernels is first imported. Set here, before any
    # test module is imported, so that does not depend on which test file happens to be collected
    # first. Nothing else looks at it: backend=None on CPU never picks the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA = Path(__file__).resolve().parent / "data" / "posts.jsonl.gz"


def load_posts(n: int | None = None) -> list[dict]:
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows if n is None else rows[:n]


@pytest.fixture(scope="session")
def posts() -> list[str]:
    return [r["text"] for r in load_posts()]


@pytest.fixture(scope="session")
def default_folder() -> Path:
    from postembed_fast.loading import default_model_folder

    return default_model_folder()


@pytest.fixture(scope="session")
def st_model(default_folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_folder), device="cpu")


@pytest.fixture(scope="session")
def embedder():
    """The default model on the CPU in float32 (always, also on a GPU machine): the reference that
    tests of other devices and dtypes compare with. Tests of the default device use `default_device`."""
    from postembed_fast import Embedder

    return Embedder(device="cpu", dtype=torch.float32)


# ---- which device a test means ------------------------------------------------------------
# fast_embed() / Embedder() / get_embedder() without device= run on CUDA in float16 where a GPU is
# visible, else on the CPU in the capability table's dtype (README: bfloat16 where the CPU has AMX or
# AVX512-BF16, float32 elsewhere). A test meant for "whatever the default is" takes
# `default_device` / `default_dtype` and compares with that dtype's tolerance, so the same lines
# decide what is expected here and on a GPU machine; a test meant for one device names it.
def _default_cpu_dtype() -> torch.dtype:
    from postembed_fast.kernels import cpu_isa

    return cpu_isa.compute_dtype()[0]  # the CPU capability table: bfloat16 with AMX/AVX512-BF16


DEFAULT_DTYPE_OF = {"cpu": _default_cpu_dtype(), "cuda": torch.float16}  # the documented contract
DEFAULT_DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")


@dataclass(frozen=True)
class EmbedTolerance:
    min_cos: float  # worst row cosine against the float32 reference
    atol: float  # largest element difference (rows are unit vectors of 384 elements ~0.05)


# How far embeddings computed in a dtype may be from float32 ones of the same model and texts.
# Seen: float16 0.9999992 / 2.6e-4 on the CPU, 0.9999996 / 1.2e-4 on an H200; bfloat16 0.99995 / 2.1e-3
# on the CPU (0.99991 on the H200).
EMBED_TOLERANCE = {
    torch.float32: EmbedTolerance(min_cos=0.99999, atol=1e-5),
    torch.float16: EmbedTolerance(min_cos=0.999, atol=2e-3),
    torch.bfloat16: EmbedTolerance(min_cos=0.999, atol=1e-2),
}


def assert_embeddings_close(got, want, dtype: torch.dtype) -> None:
    """got (computed in `dtype`) is within EMBED_TOLERANCE[dtype] of the float32 reference `want`."""
    tol = EMBED_TOLERANCE[dtype]
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    c = cosines(got, want)
    assert c.min() >= tol.min_cos, f"{dtype}: row {c.argmin()} has cosine {c.min():.7f} < {tol.min_cos}"
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    assert diff <= tol.atol, f"{dtype}: largest element difference {diff:.2e} > {tol.atol}"


@pytest.fixture(scope="session")
def default_device() -> str:
    """The device type fast_embed()/Embedder() use when device= is not given on this machine."""
    return DEFAULT_DEVICE


@pytest.fixture(scope="session")
def default_dtype(default_device) -> torch.dtype:
    return DEFAULT_DTYPE_OF[default_device]


@pytest.fixture(scope="session")
def embeddings_close():
    return assert_embeddings_close


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=needs_cuda)])
def each_device(request) -> str:
    """Run a test once per device type: the CPU, and CUDA where this machine has a GPU."""
    return request.param


@pytest.fixture(scope="session")
def embedder_on(embedder):
    """embedder_on(device) -> one Embedder of the default model per device type (its default dtype),
    shared by the session; the CPU one is `embedder`."""
    from postembed_fast import Embedder

    made = {"cpu": embedder}

    def get(device: str):
        if device not in made:
            made[device] = Embedder(device=device)
        return made[device]

    return get


def _st_modules():
    try:
        from sentence_transformers.sentence_transformer import modules as m

        return m.Transformer, m.Pooling, m.Dense, m.Normalize
    except (ImportError, AttributeError):
        from sentence_transformers import models as m

        return m.Transformer, m.Pooling, m.Dense, m.Normalize


def make_random_st_folder(root: Path, default_folder: Path, *, model_type="bert", hidden=256, heads=4, layers=3,
                          intermediate=512, pooling="cls", dense_out=None, max_seq_length=128, seed=0) -> Path:
    """A randomly initialized encoder saved with transformers (safetensors) plus sentence-transformers
    modules saved by sentence-transformers itself, reusing the default model's tokenizer files."""
    with torch.random.fork_rng(devices=[]):  # seeded weights, and the caller's RNG state left as it was
        torch.manual_seed(seed)
        return _make_random_st_folder(root, default_folder, model_type, hidden, heads, layers, intermediate, pooling,
                                      dense_out, max_seq_length)


def _make_random_st_folder(root, default_folder, model_type, hidden, heads, layers, intermediate, pooling, dense_out,
                           max_seq_length):
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    enc_dir = root / "hf"
    kw = dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers, intermediate_size=intermediate,
              vocab_size=30522, max_position_embeddings=max_seq_length + 2 + (model_type != "bert"))
    if model_type == "bert":
        model = BertModel(BertConfig(**kw), add_pooling_layer=False)
    else:
        model = RobertaModel(RobertaConfig(**kw, pad_token_id=1, type_vocab_size=1), add_pooling_layer=False)
    model.save_pretrained(enc_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(default_folder / name, enc_dir / name)
    Transformer, Pooling, Dense, Normalize = _st_modules()
    mods = [Transformer(str(enc_dir), max_seq_length=max_seq_length), Pooling(hidden, pooling_mode=pooling)]
    if dense_out:
        mods.append(Dense(hidden, dense_out))
    mods.append(Normalize())
    out = root / "st"
    SentenceTransformer(modules=mods, device="cpu").save(str(out))
    return out


def np_quantize(x, precision, ranges=None):
    """The formulas of the precision contract, in numpy float32 (independent of the package)."""
    x = np.asarray(x, dtype=np.float32)
    if precision == "float32":
        return x
    if precision == "float16":
        return x.astype(np.float16)
    if precision in ("uint8", "int8"):
        lo, hi = ranges[0].astype(np.float32), ranges[1].astype(np.float32)
        q = np.clip(np.floor((x - lo) / ((hi - lo) / np.float32(255)) + np.float32(0.5)), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    packed = np.packbits(x > 0, axis=-1)
    return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)


def quantize_ties(x, ranges):
    """Mask of elements whose uint8 code sits at an exact rounding tie (within float32 noise)."""
    lo, hi = ranges[0], ranges[1]
    t = (np.asarray(x, np.float64) - lo) / ((hi - lo) / 255.0) + 0.5
    return np.abs(t - np.round(t)) < 1e-4


@pytest.fixture
def reference_quantize():
    return np_quantize


@pytest.fixture
def tie_mask():
    return quantize_ties


@pytest.fixture
def make_random_model(tmp_path, default_folder):
    """make(**shape) -> a new model folder under this test's tmp_path (a fresh one per call)."""
    made = []

    def make(**kw):
        made.append(tmp_path / f"random-model-{len(made)}")
        return make_random_st_folder(made[-1], default_folder, **kw)

    return make


def cosines(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def run_into_poisoned_buffers(fn, shape, precision, device="cpu"):
    """Run fn(out) into two differently poisoned buffers of `precision`'s dtype; both must come back
    fully overwritten (and equal). Returns the first."""
    from postembed_fast.kernels.precision import TABLE

    dtype = TABLE[precision].torch_dtype
    outs = []
    for fill in (0x00, 0xFF):
        out = torch.empty(shape, dtype=dtype, device=device)
        if dtype.is_floating_point:
            out.fill_(float("nan") if fill else 12345.0)
        else:
            out.view(torch.uint8).fill_(fill)
        res = fn(out)
        assert res is out
        outs.append(out.clone())
    a, b = outs
    if dtype.is_floating_point:
        assert not torch.isnan(a).any() and not (b == 12345.0).any() and not torch.isnan(b).any()
    assert torch.equal(a.view(torch.uint8) if not dtype.is_floating_point else a,
                       b.view(torch.uint8) if not dtype.is_floating_point else b), "some elements were not written"
    return a


@pytest.fixture
def poisoned_runs():
    """run_into_poisoned_buffers(fn, shape, precision, device): a kernel's out= buffer fully written."""
    return run_into_poisoned_buffers


@pytest.fixture
def cos():
    return cosines


def cpu_isa_unavailable(level: str) -> str | None:
    """Why the C++ kernels' `level` build cannot run here, or None."""
    from postembed_fast.kernels import _ext, cpu_isa

    if _ext._C is None:
        return f"compiled extension unavailable: {_ext.UNAVAILABLE_REASON}"
    if cpu_isa.ISA_LEVELS.index(level) > _ext._C.cpu_isa_detected():
        return f"this CPU's best ISA level is {cpu_isa.detected_level()}; {level} needs {cpu_isa.LEVEL_FLAGS[level]}"
    return None


@contextlib.contextmanager
def cpu_isa_capped(level: str):
    """Every C++ CPU kernel runs its `level` build (skip where the CPU has not got it)."""
    from postembed_fast.kernels import _ext, cpu_isa

    reason = cpu_isa_unavailable(level)
    if reason:
        pytest.skip(reason)
    prev = _ext._C._set_cpu_isa_cap(cpu_isa.ISA_LEVELS.index(level))
    try:
        yield level
    finally:
        _ext._C._set_cpu_isa_cap(prev)


def cpu_avx2_allowed(allowed: bool):
    """The AVX2 build (allowed) or the baseline build: cpu_isa_capped in the older two-build terms."""
    return cpu_isa_capped("avx2" if allowed else "baseline")


def _isa_levels() -> tuple[str, ...]:
    from postembed_fast.kernels import cpu_isa

    return cpu_isa.ISA_LEVELS


@pytest.fixture(params=_isa_levels())
def cpu_isa(request):
    """Run a C++ CPU kernel test in each ISA build (baseline, avx2, avx512, amx), skipped above this CPU's."""
    with cpu_isa_capped(request.param):
        yield request.param


# ---- kernel backends: a test of an op runs once per backend (kernels/dispatch.py decides which run here) ----
#
#     @pytest.mark.backends("add_layernorm")                      # -> arguments `backend`, `device`
#     @pytest.mark.backends("varlen_attention", cpu_isa=True)     # "cpp" twice: AVX2 and baseline builds
#     @pytest.mark.backends(op, "n, dtype", CASES, keep=takes)    # x CASES, where keep(backend, device, *case)
#
# Every backend of the op is listed; one that cannot run here is skipped with dispatch's reason. Each runs
# on its own device: torch and cpp on the CPU; triton on the GPU where there is one, else on the CPU
# under the Triton interpreter (TRITON_INTERPRET=1, set above), orders of magnitude slower: tests give
# backend == "triton" on device == "cpu" small sizes (their keep=). device="cpu" / "cuda" in the mark
# puts every backend on that device, device=("cpu", "cuda") runs every backend on each.

def _triton_kernels_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    from postembed_fast.kernels import attention

    # triton.jit picks the interpreter when a kernel is decorated, i.e. at the first import of the kernels
    return isinstance(attention._varlen_attention_kernel, InterpretedFunction)


def backend_unavailable(op: str, backend: str, device: str) -> str | None:
    """None if `op` runs with `backend` on `device` here, else why not (dispatch's words)."""
    from postembed_fast.kernels import _ext, dispatch

    if device == "cuda" and not HAS_CUDA:
        return "no CUDA GPU on this machine"
    if backend == "cpp" and not _ext.has_cpu_ext():
        return _ext.UNAVAILABLE_REASON  # no "cpp" implementation is registered then
    try:
        dispatch.choose(op, torch.device(device), backend)
    except RuntimeError as exc:  # not implemented for this device, or unavailable, with the reason
        return str(exc)
    if backend == "triton" and device == "cpu" and not _triton_kernels_interpreted():
        return ("the Triton kernels are not interpreted (TRITON_INTERPRET is not 1, or postembed_fast.kernels "
                "was imported before conftest.py set it)")
    return None


def _backends_of(op: str) -> list[str]:
    """The backends `op` has (dispatch.implemented), "cpp" included where the compiled module is missing."""
    from postembed_fast.kernels import _ext, dispatch

    have = dispatch.implemented()[op]
    return [b for b in ("torch", "cpp", "triton") if b in have or (b == "cpp" and not _ext.has_cpu_ext())]


def available_backends(op: str, device: str = "cpu") -> list[str]:
    """The backends of `op` that run on `device` here."""
    return [b for b in _backends_of(op) if backend_unavailable(op, b, device) is None]


def backends_for(op: str, device: str | None = None, cpu_isa: bool = False) -> list:
    """pytest params (backend, device) for every backend of `op`, skipped with the reason where it cannot
    run; cpu_isa=True runs "cpp" on the CPU in every ISA build (marked cpu_isa_level(level)), the builds above
    this CPU's skipped with the reason."""
    params = []
    for backend in _backends_of(op):
        dev = device or ("cuda" if backend == "triton" and HAS_CUDA else "cpu")
        reason = backend_unavailable(op, backend, dev)
        marks = [pytest.mark.skip(reason=f"{op} backend={backend} on {dev}: {reason}")] if reason else []
        name = backend if dev == "cpu" else f"{backend}-{dev}"
        if backend == "cpp" and cpu_isa and dev == "cpu":
            params += [pytest.param(backend, dev, id=f"{name}-{level}", marks=[
                *marks, pytest.mark.cpu_isa_level(level),
                *([pytest.mark.skip(reason=why)] if not marks and (why := cpu_isa_unavailable(level)) else [])])
                for level in _isa_levels()]
        else:
            params.append(pytest.param(backend, dev, marks=marks, id=name))
    return params


def _case_id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).split(".")[-1]
    return str(value)


def _with_cases(backends: list, cases, keep) -> list:
    """cases x backends (tuples, or pytest.param with an id), where keep(backend, device, *case); the
    backends of one case run one after another (a test may cache what they share, e.g. a reference)."""
    out = []
    for case in cases:
        for b in backends:
            values, marks, cid = (case.values, list(case.marks), case.id) if hasattr(case, "values") else \
                (tuple(case), [], None)
            if keep is not None and not keep(*b.values, *values):
                continue
            cid = cid or "-".join(map(_case_id, values))
            out.append(pytest.param(*b.values, *values, marks=[*b.marks, *marks], id=f"{b.id}-{cid}"))
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(op, argnames=None, cases=(), *, device=None, cpu_isa=False, "
                                       "keep=None): run once per backend of the kernel op `op` (tests/conftest.py)")
    config.addinivalue_line("markers", "cpu_isa_level(level): the C++ CPU kernels capped at that ISA build")


def pytest_generate_tests(metafunc):
    mark = metafunc.definition.get_closest_marker("backends")
    if mark is None:
        return
    op, *rest = mark.args
    argnames, cases = (rest + [None, ()][len(rest):])[:2]
    devices = mark.kwargs.get("device")
    backends = [b for dev in (devices if isinstance(devices, (list, tuple)) else [devices])
                for b in backends_for(op, dev, mark.kwargs.get("cpu_isa", False))]
    keep = mark.kwargs.get("keep")
    if argnames is None:
        metafunc.parametrize("backend, device", [b for b in backends if keep is None or keep(*b.values)])
    else:
        metafunc.parametrize(f"backend, device, {argnames}", _with_cases(backends, cases, keep))


@pytest.fixture(autouse=True)
def _cpu_build_of_the_param(request):
    """A test param marked cpu_isa_level(level) (backends_for(cpu_isa=True)) runs in that C++ build."""
    mark = request.node.get_closest_marker("cpu_isa_level")
    if mark is None:
        yield
        return
    with cpu_isa_capped(mark.args[0]):
        yield


@pytest.fixture(scope="session")
def kernel_backends():
    """available_backends(op, device="cpu") -> the backends of `op` that run on `device` here."""
    return available_backends


def pack_for_encoder(seqs, device="cpu"):
    """Token id lists -> Encoder.forward's (input_ids, positions, cu_seqlens, max_seqlen), through
    the product's packing (postembed_fast/packing.py, tested in tests/test_packing.py)."""
    import numpy as np
    import torch

    from postembed_fast.packing import flatten, pack

    b = pack(*flatten(seqs), np.arange(len(seqs)))
    return (*(torch.from_numpy(a).to(device) for a in (b.input_ids, b.positions, b.cu_seqlens)), b.max_seqlen)


@pytest.fixture
def encoder_inputs():
    return pack_for_encoder


# ---- real servers on loopback: free ports, redis-server ------------------------------------------
def free_port_number() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """A redis-server of Debian's package on a free loopback port in a temp folder (optionally AOF
    fsynced on every write, for restart tests)."""

    def __init__(self, tmp, persistent=False):
        self.dir, self.port, self.persistent, self.proc = Path(tmp), free_port_number(), persistent, None

    def start(self):
        import subprocess
        import time

        import redis

        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c = self.client()
        for _ in range(200):
            try:
                if c.ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.025)
        raise RuntimeError(f"redis-server did not start: {(self.dir / 'redis.log').read_text()[-2000:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server saves (AOF fsynced) and exits
            self.proc.wait(10)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


@pytest.fixture(scope="session")
def free_port():
    """A function returning a free TCP port on 127.0.0.1."""
    return free_port_number


@pytest.fixture(scope="session")
def start_redis():
    """start_redis(tmp_dir, persistent=False) -> a started RedisServer (skips without redis / redis-server)."""
    pytest.importorskip("redis", reason="redis-py is not installed (pip install 'postembed_fast[nearline]')")
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    started = []

    def start(tmp, persistent=False):
        started.append(RedisServer(tmp, persistent).start())
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory, start_redis):
    """A redis-server of the test module's own (RedisServer: .url, .port...)."""
    return start_redis(tmp_path_factory.mktemp("redis"))


SERVE_PYTHON = os.environ.get("POSTEMBED_SERVE_PYTHON") or sys.executable  # CI: a fresh venv with the wheel
SERVE_START_TIMEOUT_S = 120


class ServeProcess:
    """`python -m postembed_fast.serve --device cpu --port <free> ARGS` (the embedding server, a real
    process), logs in a temporary file. With POSTEMBED_SERVE_PYTHON (CI: the python of a fresh venv
    holding only the built wheel + the serve extra) it runs the installed wheel, else this interpreter."""

    def __init__(self, *args: str, env: dict | None = None):
        import subprocess
        import tempfile

        self.port = free_port_number()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="postembed-serve-", suffix=".log", delete=False)
        full_env = {k: v for k, v in os.environ.items() if k != "POSTEMBED_API_KEY"}
        full_env.update(env or {})
        cmd = [SERVE_PYTHON, "-m", "postembed_fast.serve", "--device", "cpu", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", *args]
        # cwd: not the repo root, whose source folder is not an importable package
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=tempfile.gettempdir())
        self.seen: list[int] = []  # /health statuses observed while starting

    def logs(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-5000:]

    def wait_ready(self, timeout: float = SERVE_START_TIMEOUT_S) -> "ServeProcess":
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} while starting:\n{self.logs()}")
            try:
                status = httpx.get(f"{self.url}/health", timeout=2).status_code
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            self.seen.append(status)
            if status == 200:
                return self
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"server not healthy after {timeout} s:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self.log.closed:
            self.log.close()
            os.unlink(self.log.name)


@pytest.fixture(scope="session")
def serve_process():
    """serve_process(*ARGS, env=None) -> a started (not yet ready: .wait_ready()) ServeProcess; any
    still running at the end of the session is killed."""
    started = []

    def start(*args, env=None):
        started.append(ServeProcess(*args, env=env))
        return started[-1]

    yield start
    for s in started:
        s.stop()


_STREAM_NAMES = iter(range(10**6))


@pytest.fixture
def stream_names():
    """Fresh near-line names for one test: the stream, group, key prefix, output and dead-letter
    streams (the fields of nearline.Config), so tests sharing a Redis server never see each other's."""
    n = next(_STREAM_NAMES)
    return {"stream": f"posts{n}", "group": "embedders", "prefix": f"emb{n}:", "out_stream": f"posts{n}.embedded",
            "dead_stream": f"posts{n}.dead"}


# ---- a private network namespace: servers that bind every interface see loopback only ---------------
@contextlib.contextmanager
def private_loopback_network():
    """Move this thread (the main thread: whatever it starts inherits it) into a new network namespace
    holding only `lo`, and back at exit. Ray 2.60's GCS/raylet/workers listen on every interface even
    with _node_ip_address=127.0.0.1; in here there is no other interface to listen on. Needs root
    (CAP_SYS_ADMIN); yields None when isolated, else the reason it could not be."""
    import ctypes
    import fcntl
    import socket
    import struct

    CLONE_NEWNET, SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x40000000, 0x8913, 0x8914, 0x1
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            yield f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())} (needs root)"
            return
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # `ip link set lo up`, without iproute2
                ifr = struct.pack("16sh", b"lo", 0)
                flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
                fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
            yield None
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original network namespace failed")
    finally:
        os.close(home)


def listening_addresses() -> list[str]:
    """Local addresses of this network namespace's listening TCP sockets (from /proc/net/tcp, tcp6)."""
    import ipaddress

    out = []
    for name, width in (("tcp", 4), ("tcp6", 16)):
        try:
            lines = open(f"/proc/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            raw = bytes.fromhex(local.split(":")[0])
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out.append(str(ipaddress.ip_address(raw if width == 16 else raw[:4])))
    return out


def is_loopback(addr: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(addr)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.fixture(scope="session")
def loopback_network():
    """The private_loopback_network context manager (for module-scoped fixtures)."""
    return private_loopback_network


@pytest.fixture(scope="session")
def listening_sockets():
    """-> (listening_addresses, is_loopback)."""
    return listening_addresses, is_loopback
