"""Static checks of docker/: Docker cannot run here, so every name the files use is checked
against what exists (paths in the repository, CLI options of the installed tools, settings
names Prefect / MLflow / DeepSpeed read, variables of the env file)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent
COMPOSE_VAR = re.compile(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)(?::?[-?]([^}]*))?\}")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def env_example():
    values = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def resolve(text: str, env: dict) -> str:
    """Compose interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR:?message}``."""

    def one(match):
        name, default = match.group(1), match.group(2)
        return env.get(name) or (default if default is not None and "-" in match.group(0) else "")

    return COMPOSE_VAR.sub(one, text)


def test_stack_services_and_health_checks(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "mlflow", "worker"}
    for name, service in services.items():
        assert "test" in service["healthcheck"], name
    assert services["worker"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert "asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "/mlflow" in [v.split(":")[1] for v in services["mlflow"]["volumes"]]


def test_ports_bind_to_localhost_by_default(compose):
    published = [port for s in compose["services"].values() for port in s.get("ports", [])]
    assert published, "the UI ports are published"
    for port in published:
        assert resolve(port, {}).startswith("127.0.0.1:"), port


def test_every_variable_comes_from_the_env_file(compose, env_example):
    text = (DOCKER / "compose.yaml").read_text()
    used = {m.group(1) for m in COMPOSE_VAR.finditer(text)}
    assert used <= set(env_example), used - set(env_example)
    prefect_yaml = (REPO / "prefect.yaml").read_text()
    unused = [k for k in env_example if k not in used and f"$ {k}" not in prefect_yaml.replace("{{ $", "$ ")]
    assert not unused, f"variables in .env.example nobody reads: {unused}"
    # Secrets are placeholders in the example and the real file is never committed.
    for key in ("POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env_example[key] == "change-me"
    assert env_example["PREFECT_API_AUTH_STRING"].endswith(":change-me")
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO)
    assert ignored.returncode == 0, "docker/.env must be git-ignored"
    # Container-side variables ($$VAR) are set in that service's environment or by the image.
    for name, service in compose["services"].items():
        for var in re.findall(r"\$\$\{?([A-Z_]+)", yaml.safe_dump(service)):
            assert var in service.get("environment", {}), (name, var)


def test_paths_exist(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == REPO, name
            assert (context / build["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), (name, source)
    dockerfile = (DOCKER / "Dockerfile").read_text()
    copies = re.findall(r"^COPY\s+(.+)$", dockerfile, flags=re.M)
    assert copies
    for line in copies:
        for source in shlex.split(line)[:-1]:
            assert (REPO / source).exists(), source
    assert "/opt/arr-coc" in dockerfile and "ARR_COC_HOME=/opt/arr-coc" in dockerfile


def test_deepspeed_ops_named_in_the_dockerfile_exist():
    import deepspeed

    builders = Path(deepspeed.__file__).parent / "ops" / "op_builder"
    sources = "\n".join(p.read_text() for p in builders.rglob("*.py"))
    flags = re.findall(r"\b(DS_BUILD_[A-Z_]+)=1", (DOCKER / "Dockerfile").read_text())
    assert "DS_BUILD_FUSED_ADAM" in flags and "DS_BUILD_CPU_ADAM" in flags
    for flag in flags:
        assert f'"{flag}"' in sources or f"'{flag}'" in sources, flag
    for tool in ("ds_report", "arr-coc", "deepspeed", "prefect", "mlflow"):
        assert (BIN / tool).exists(), tool


def _commands(compose):
    """(service, argv) of every command line the stack runs."""
    for name, service in compose["services"].items():
        command = service.get("command")
        if not command:
            continue
        if command[:2] == ["sh", "-c"]:
            for part in command[2].split("&&"):
                yield name, shlex.split(part.replace("exec ", "", 1))
        else:
            yield name, command


def _help(argv: list[str]) -> str:
    # The subcommand words end where the first option (or a value) starts.
    words = []
    for arg in argv[1:]:
        if arg.startswith("-"):
            break
        words.append(arg)
    result = subprocess.run(
        [str(BIN / argv[0]), *words, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": str(BIN), "COLUMNS": "200", "HOME": "/tmp", "PREFECT_HOME": "/tmp/prefect-help"},
    )
    assert result.returncode == 0, (argv, result.stderr[-500:])
    return result.stdout


@pytest.mark.integration
def test_every_command_and_option_exists(compose):
    seen = 0
    for service, argv in _commands(compose):
        if argv[0] not in ("prefect", "mlflow"):
            continue
        # `prefect --no-prompt deploy`: a global option before the subcommand.
        if argv[:2] == ["prefect", "--no-prompt"]:
            assert "--no-prompt" in _help(["prefect"])
            argv = ["prefect", *argv[2:]]
        text = _help(argv)
        for option in [a.split("=")[0] for a in argv if a.startswith("--")]:
            assert option in text, (service, option)
        seen += 1
    assert seen >= 5
    from importlib.metadata import entry_points

    assert "basic-auth" in {e.name for e in entry_points(group="mlflow.app")}


def test_settings_names_are_read_by_the_tools(compose):
    from prefect.settings import Settings

    def prefect_names(model, prefix="PREFECT_"):
        names = set()
        for field, info in type(model).model_fields.items():
            value = getattr(model, field)
            if hasattr(type(value), "model_fields"):
                names |= prefect_names(value, f"{prefix}{field.upper()}_")
            else:
                names.add(f"{prefix}{field.upper()}")
                alias = info.validation_alias
                for choice in getattr(alias, "choices", []) or []:
                    if isinstance(choice, str):
                        names.add(choice.upper())
        return names

    import mlflow.environment_variables as mlflow_env

    known = prefect_names(Settings()) | {n for n in dir(mlflow_env) if n.startswith("MLFLOW_")}
    dockerfile_env = re.findall(r"\b(PREFECT_[A-Z_]+)=", (DOCKER / "Dockerfile").read_text())
    for name, service in compose["services"].items():
        for var in list(service.get("environment", {})) + dockerfile_env:
            if var.startswith(("PREFECT_", "MLFLOW_")):
                assert var in known, (name, var)
