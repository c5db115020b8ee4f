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


GPU_WORKERS = ("worker-review", "worker-gpu")
FOUNDRY_SERVICES = ("worker-review", "worker-gpu", "worker-cpu", "beat", "flower", "metrics")


def test_all_services_present(services):
    assert {"redis", "postgres", "migrate", "models", *FOUNDRY_SERVICES} <= set(services)


def test_every_service_has_an_image_or_build(services):
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), name
    assert services["redis"]["image"].startswith("redis:") and services["postgres"]["image"].startswith("postgres:")


def test_redis_persists(services):
    cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in cmd
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


def test_healthchecks(services):
    for name in ("redis", "postgres", *FOUNDRY_SERVICES):
        hc = services[name].get("healthcheck")
        assert hc and hc["test"], f"{name} has no healthcheck"


def test_migrations_run_once_before_workers(services):
    assert services["migrate"]["command"] == ["foundry", "db", "upgrade"]  # the installed package's migrations
    assert services["migrate"]["restart"] == "no"
    for name in FOUNDRY_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["redis"]["condition"] == deps["postgres"]["condition"] == "service_healthy", name


def test_the_default_model_is_prepared_before_gpu_workers_start(services):
    models = services["models"]
    assert models["command"] == ["foundry", "prepare-model"] and models["restart"] == "no"
    assert models["environment"]["FOUNDRY_BASE_MODEL"] == ""  # the embedded SmolLM2, whatever the workers use
    assert "foundry-data:/data" in models["volumes"]
    for name in GPU_WORKERS:
        assert services[name]["depends_on"]["models"]["condition"] == "service_completed_successfully", name
        assert "foundry-data:/data" in services[name]["volumes"], name
        # empty = the prepared model under /data/models, where `models` wrote it
        assert services[name]["environment"]["FOUNDRY_BASE_MODEL"] == "${FOUNDRY_BASE_MODEL:-}"
        assert services[name]["environment"]["FOUNDRY_DATA_DIR"] == "/data"


def test_hub_access_is_configurable_with_a_cache_volume(compose, services):
    env = services["worker-review"]["environment"]
    assert env["HF_HUB_OFFLINE"] == "${HF_HUB_OFFLINE:-1}"
    assert env["HF_HOME"] == "/hf-cache" and "hf-cache:/hf-cache" in services["worker-review"]["volumes"]
    assert "hf-cache" in compose["volumes"]


def test_each_gpu_worker_is_pinned_to_its_own_device(services):
    pinned = []
    for name in GPU_WORKERS:
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert "count" not in device, f"{name}: count shares the first GPU; pin with device_ids"
        (ids,) = device["device_ids"]
        pinned.append(re.fullmatch(r"\$\{(FOUNDRY_\w+_GPU):-(\d+)\}", ids).groups())
        assert services[name]["environment"]["FOUNDRY_DEVICE"] == "cuda:0", name  # the one device it sees
        assert services[name]["deploy"].get("replicas", 1) == 1, f"{name}: replicas would share one device"
    assert len({var for var, _ in pinned}) == len({default for _, default in pinned}) == len(GPU_WORKERS)
    assert "resources" not in services["worker-cpu"].get("deploy", {})
    assert "device_ids" in (ROOT / "docs" / "operations.md").read_text()


def test_secrets_come_from_files(compose, services):
    declared = compose["secrets"]
    assert set(declared) == {"postgres_password", "flower_basic_auth", "metrics_password", "grafana_admin_password",
                             "minio_root_user", "minio_root_password"}
    assert all(s["file"].startswith("${FOUNDRY_SECRETS_DIR:-./secrets}/") for s in declared.values())
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    for name in ("migrate", "models", *FOUNDRY_SERVICES):
        svc = services[name]
        assert "postgres_password" in svc["secrets"], name
        assert svc["environment"]["FOUNDRY_DATABASE_PASSWORD_FILE"] == "/run/secrets/postgres_password", name
    assert "flower_basic_auth" in services["flower"]["secrets"]
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH_FILE"] == "/run/secrets/flower_basic_auth"
    assert "metrics_password" in services["metrics"]["secrets"]
    assert services["metrics"]["environment"]["FOUNDRY_METRICS_PASSWORD_FILE"] == "/run/secrets/metrics_password"
    assert "metrics_password" in services["prometheus"]["secrets"]
    assert "grafana_admin_password" in services["grafana"]["secrets"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"


def test_the_database_url_carries_no_password(services):
    from sqlalchemy.engine import make_url

    for name in ("migrate", *FOUNDRY_SERVICES):
        url = services[name]["environment"]["FOUNDRY_DATABASE_URL"]
        assert make_url(url).password is None and "$" not in url, name


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


def test_flower_credentials_are_not_on_its_command_line(services):
    flower = services["flower"]
    assert flower["command"][:2] == ["foundry", "flower"]  # reads FLOWER_BASIC_AUTH_FILE, refuses to run without
    assert not any("auth" in str(part).lower() or "$" in str(part) for part in flower["command"])
    assert "FLOWER_BASIC_AUTH" not in flower["environment"]


def test_beat_and_exporter_healthchecks_check_their_work(services):
    beat = " ".join(services["beat"]["healthcheck"]["test"])
    assert "/data/celerybeat-schedule" in beat  # `foundry beat` keeps its schedule there and syncs it
    exporter = " ".join(services["metrics"]["healthcheck"]["test"])
    assert "localhost:9808/metrics" in exporter and "FOUNDRY_METRICS_PASSWORD_FILE" in exporter


def test_no_secret_is_hard_coded(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD:" not in text and "FOUNDRY_METRICS_PASSWORD:" not in text
    assert not re.search(r"(?i)password\s*[:=]\s*['\"]?[A-Za-z0-9]{3,}['\"]?\s*$", text, re.M)


def test_foundry_environment_names_real_settings(services):
    fields = {f"FOUNDRY_{name.upper()}" for name in Settings.model_fields}
    for name, svc in services.items():
        for key in (svc.get("environment") or {}):
            if key.startswith("FOUNDRY_") and not key.startswith("FOUNDRY_METRICS_"):
                assert key.removesuffix("_FILE") in fields, f"{name}: {key} is not a Foundry setting"


def test_workers_use_json_redis_and_postgres(services):
    env = services["worker-gpu"]["environment"]
    assert env["FOUNDRY_BROKER_URL"].startswith("redis://redis:")
    assert env["FOUNDRY_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_metrics_service_requires_auth(services):
    m = services["metrics"]
    assert m["command"][:3] == ["foundry", "metrics", "serve"]
    assert m["environment"]["FOUNDRY_METRICS_USER"] and "--no-auth-i-know" not in m["command"]


def test_http_surfaces_are_not_published_beyond_loopback(services):
    for name in ("flower", "metrics"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name


def test_the_image_is_a_regular_install_with_the_worker_extra():
    text = (ROOT / "Dockerfile").read_text()
    assert 'pip install ".[worker,flower]"' in text and "pip install -e" not in text
    assert "WORKDIR /home/foundry" in text  # runs outside the source folder: the installed migrations are used


# ---- the artifact store (MinIO) and each worker's own cache ----

def test_minio_persists_is_healthchecked_and_its_bucket_is_created_once(services, compose):
    minio, init = services["minio"], services["minio-init"]
    assert minio["image"].startswith("minio/minio:") and "latest" not in minio["image"]
    assert any(v.endswith(":/data") and v.split(":")[0] in compose["volumes"] for v in minio["volumes"])
    assert minio["healthcheck"]["test"][:3] == ["CMD", "mc", "ready"]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy" and init["restart"] == "no"
    assert "mc mb --ignore-existing store/foundry" in " ".join(init["command"])
    assert minio["environment"] == {"MINIO_ROOT_USER_FILE": "/run/secrets/minio_root_user",
                                    "MINIO_ROOT_PASSWORD_FILE": "/run/secrets/minio_root_password"}
    for svc in (minio, init):
        assert set(svc["secrets"]) == {"minio_root_user", "minio_root_password"}
    assert "$$(cat /run/secrets/minio_root_password)" in " ".join(init["command"])
    assert "MINIO_ROOT_PASSWORD:" not in (ROOT / "docker-compose.yml").read_text()  # only the secret file


def test_every_worker_uses_the_store_and_has_its_own_cache_volume(services, compose):
    caches = set()
    for name in ("worker-review", "worker-gpu", "worker-cpu", "beat"):
        env = services[name]["environment"]
        assert env["FOUNDRY_ARTIFACT_URL"].startswith("${FOUNDRY_ARTIFACT_URL:-s3://foundry/"), name
        assert env["FOUNDRY_ARTIFACT_ENDPOINT_URL"].endswith("http://minio:9000}") and env["FOUNDRY_CACHE_DIR"] == "/cache"
        assert services[name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert env["AWS_ACCESS_KEY_ID_FILE"] == "/run/secrets/minio_root_user" and "AWS_SECRET_ACCESS_KEY" not in env
        assert env["AWS_SECRET_ACCESS_KEY_FILE"] == "/run/secrets/minio_root_password", name
        assert {"minio_root_user", "minio_root_password"} <= set(services[name]["secrets"]), name
    for name in ("worker-review", "worker-gpu", "worker-cpu"):
        [cache] = [v.split(":")[0] for v in services[name]["volumes"] if v.split(":")[1].startswith("/cache")]
        assert cache in compose["volumes"]
        caches.add(cache)
    assert len(caches) == 3  # never shared between workers
