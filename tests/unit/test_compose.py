"""docker-compose.yml, validated statically (no Docker engine here): the production shape stays honest."""

import re
from pathlib import Path

import pytest
import yaml

from domain.config import Settings
from worker.cli.service import worker_argv

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def test_all_services_present(services):
    assert {"redis", "postgres", "migrate", "worker-review", "worker-gpu", "worker-cpu", "beat", "flower", "metrics"} <= set(services)


def test_every_service_has_an_image_or_build(services):
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), name
    assert services["redis"]["image"].startswith("redis:") and services["postgres"]["image"].startswith("postgres:")


def test_redis_persists(services):
    cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in cmd
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


def test_healthchecks(services):
    for name in ("redis", "postgres", "worker-review", "worker-gpu", "worker-cpu", "flower"):
        hc = services[name].get("healthcheck")
        assert hc and hc["test"], f"{name} has no healthcheck"


def test_migrations_run_once_before_workers(services):
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["migrate"]["restart"] == "no"
    for name in ("worker-review", "worker-gpu", "worker-cpu", "beat", "flower"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy", name


def test_gpu_workers_reserve_an_nvidia_device(services):
    for name in ("worker-review", "worker-gpu"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
    assert "resources" not in services["worker-cpu"].get("deploy", {})


def test_worker_commands_are_real_flavours(services):
    for name, flavour in (("worker-review", "review"), ("worker-gpu", "long"), ("worker-cpu", "cpu")):
        cmd = services[name]["command"]
        assert cmd[:4] == ["foundry", "worker", "--flavour", flavour]
        argv = worker_argv(flavour)
        pool = argv[argv.index("-P") + 1]
        assert pool == {"review": "threads", "long": "solo", "cpu": "prefork"}[flavour]


def test_single_beat(services):
    assert services["beat"]["command"] == ["foundry", "beat"]
    assert services["beat"]["deploy"]["replicas"] == 1


def test_flower_requires_basic_auth_from_the_environment(services):
    flower = services["flower"]
    assert "--basic_auth" in " ".join(flower["command"])
    assert re.search(r"\$\{FLOWER_USER:\?[^}]*\}:\$\{FLOWER_PASSWORD:\?[^}]*\}", flower["environment"]["FLOWER_BASIC_AUTH"])


def test_no_secret_is_hard_coded(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?" in text
    assert not re.search(r"(?i)password\s*[:=]\s*['\"]?[A-Za-z0-9]{3,}['\"]?\s*$", text, re.M)


def test_foundry_environment_names_real_settings(services):
    fields = {f"FOUNDRY_{name.upper()}" for name in Settings.model_fields}
    for name, svc in services.items():
        for key in (svc.get("environment") or {}):
            if key.startswith("FOUNDRY_") and not key.startswith("FOUNDRY_METRICS_"):
                assert key in fields, f"{name}: {key} is not a Foundry setting"


def test_workers_use_json_redis_and_postgres(services):
    env = services["worker-gpu"]["environment"]
    assert env["FOUNDRY_BROKER_URL"].startswith("redis://redis:")
    assert env["FOUNDRY_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_metrics_service_requires_auth_from_the_environment(services):
    m = services["metrics"]
    assert m["command"][:3] == ["foundry", "metrics", "serve"]
    assert m["environment"]["FOUNDRY_METRICS_PASSWORD"].startswith("${FOUNDRY_METRICS_PASSWORD:?")


def test_http_surfaces_are_not_published_beyond_loopback(services):
    for name in ("flower", "metrics"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name


# ---- the artifact store (MinIO) and each worker's own cache ----

def test_minio_persists_is_healthchecked_and_its_bucket_is_created_once(services, compose):
    minio, init = services["minio"], services["minio-init"]
    assert minio["image"].startswith("minio/minio:") and "latest" not in minio["image"]
    assert any(v.endswith(":/data") and v.split(":")[0] in compose["volumes"] for v in minio["volumes"])
    assert minio["healthcheck"]["test"][:3] == ["CMD", "mc", "ready"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy" and init["restart"] == "no"
    assert "mc mb --ignore-existing store/foundry" in " ".join(init["command"])
    assert "${MINIO_ROOT_PASSWORD:?" in (ROOT / "docker-compose.yml").read_text()  # required, never a default


def test_every_worker_uses_the_store_and_has_its_own_cache_volume(services, compose):
    caches = set()
    for name in ("worker-review", "worker-gpu", "worker-cpu", "beat"):
        env = services[name]["environment"]
        assert env["FOUNDRY_ARTIFACT_URL"].startswith("${FOUNDRY_ARTIFACT_URL:-s3://foundry/"), name
        assert env["FOUNDRY_ARTIFACT_ENDPOINT_URL"].endswith("http://minio:9000}") and env["FOUNDRY_CACHE_DIR"] == "/cache"
        assert services[name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    for name in ("worker-review", "worker-gpu", "worker-cpu"):
        [cache] = [v.split(":")[0] for v in services[name]["volumes"] if v.split(":")[1].startswith("/cache")]
        assert cache in compose["volumes"]
        caches.add(cache)
    assert len(caches) == 3  # never shared between workers
