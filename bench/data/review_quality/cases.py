"""Labelled review cases: small Python files with one known defect at a known line, each with a clean twin.

How the set was built (by hand, for issue 18): for every category the review reports (injection SQL/command/
code, XSS, SSRF, broken authentication, session fixation, sensitive data exposure, hardcoded secrets,
security misconfiguration, CORS, path traversal, insecure deserialization) and the common bug patterns
(mutable defaults, bare except, resource leaks, off-by-one), two short functions in the shape they take in
real Flask/Django/CLI code: the defect line is marked with a trailing ``# DEFECT`` (stripped before use; its
line number is the label), and the clean twin is the same file with the defect fixed the usual way.
``split`` puts the first case of each category in the tuning half and the second in the held-out half;
the held-out cases were written in other idioms than the tuning ones (other libraries, other names) and
nothing was tuned on them. Caveat: the same author wrote Foundry's line rules (domain/review/rules.py) and
this set, so the held-out half is the fairer measure.

``NOISE`` (added 2026-12-03, after the champion's held-out precision reached 1.000 on the cases alone, which left
the feedback loop nothing to improve): files of a tenant's own code with no defect that the analyzers still flag,
the false alarms real code draws and per-tenant suppression exists for. ``load_noise`` gives them per half.
"""

CASES = [
    # ---- sql_injection
    dict(category="sql_injection", split="tune", defect='''import sqlite3


def find_user(conn: sqlite3.Connection, name: str):
    cur = conn.cursor()
    cur.execute("SELECT id, email FROM users WHERE name = '%s'" % name)  # DEFECT
    return cur.fetchone()
''', clean='''import sqlite3


def find_user(conn: sqlite3.Connection, name: str):
    cur = conn.cursor()
    cur.execute("SELECT id, email FROM users WHERE name = ?", (name,))
    return cur.fetchone()
'''),
    dict(category="sql_injection", split="held", defect='''from django.db import connection


def orders_for(customer_id):
    with connection.cursor() as cursor:
        query = f"SELECT * FROM orders WHERE customer_id = {customer_id} ORDER BY created"  # DEFECT
        cursor.execute(query)
        return cursor.fetchall()
''', clean='''from django.db import connection


def orders_for(customer_id):
    with connection.cursor() as cursor:
        query = "SELECT * FROM orders WHERE customer_id = %s ORDER BY created"
        cursor.execute(query, [customer_id])
        return cursor.fetchall()
'''),
    # ---- command_injection
    dict(category="command_injection", split="tune", defect='''import os


def archive(folder):
    target = folder.rstrip("/") + ".tar.gz"
    os.system("tar czf " + target + " " + folder)  # DEFECT
    return target
''', clean='''import subprocess


def archive(folder):
    target = folder.rstrip("/") + ".tar.gz"
    subprocess.run(["tar", "czf", target, folder], check=True)
    return target
'''),
    dict(category="command_injection", split="held", defect='''import subprocess


def ping(host: str) -> str:
    out = subprocess.check_output(f"ping -c 1 {host}", shell=True)  # DEFECT
    return out.decode()
''', clean='''import subprocess


def ping(host: str) -> str:
    out = subprocess.check_output(["ping", "-c", "1", host])
    return out.decode()
'''),
    # ---- code_injection
    dict(category="code_injection", split="tune", defect='''def parse_settings(text):
    settings = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        settings[key.strip()] = eval(value)  # DEFECT
    return settings
''', clean='''import ast


def parse_settings(text):
    settings = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        settings[key.strip()] = ast.literal_eval(value.strip())
    return settings
'''),
    dict(category="code_injection", split="held", defect='''def run_hook(source: str, context: dict) -> None:
    namespace = dict(context)
    exec(source, namespace)  # DEFECT
    context.update(namespace)
''', clean='''import importlib


def run_hook(name: str, context: dict) -> None:
    module = importlib.import_module(f"hooks.{name}")
    module.run(context)
'''),
    # ---- xss
    dict(category="xss", split="tune", defect='''from flask import Flask, request

app = Flask(__name__)


@app.route("/hello")
def hello():
    name = request.args.get("name", "")
    return "<h1>Hello " + request.args.get("name", "") + "</h1>"  # DEFECT
''', clean='''from flask import Flask, request
from markupsafe import escape

app = Flask(__name__)


@app.route("/hello")
def hello():
    name = request.args.get("name", "")
    return "<h1>Hello " + str(escape(name)) + "</h1>"
'''),
    dict(category="xss", split="held", defect='''from jinja2 import Environment, FileSystemLoader


def render_comment(comment):
    env = Environment(loader=FileSystemLoader("templates"), autoescape=False)  # DEFECT
    return env.get_template("comment.html").render(comment=comment)
''', clean='''from jinja2 import Environment, FileSystemLoader, select_autoescape


def render_comment(comment):
    env = Environment(loader=FileSystemLoader("templates"), autoescape=select_autoescape())
    return env.get_template("comment.html").render(comment=comment)
'''),
    # ---- ssrf
    dict(category="ssrf", split="tune", defect='''import requests
from flask import request


def preview():
    page = requests.get(request.args["url"], timeout=5)  # DEFECT
    return page.text[:500]
''', clean='''import requests
from flask import abort, request
from urllib.parse import urlparse

ALLOWED = {"example.com", "docs.example.com"}


def preview():
    url = request.args["url"]
    if urlparse(url).hostname not in ALLOWED:
        abort(400)
    page = requests.get(url, timeout=5)
    return page.text[:500]
'''),
    dict(category="ssrf", split="held", defect='''import urllib.request


def fetch_avatar(avatar_url: str) -> bytes:
    with urllib.request.urlopen(avatar_url) as resp:  # DEFECT
        return resp.read()
''', clean='''import urllib.request
from urllib.parse import urlparse

AVATAR_HOST = "avatars.example.com"


def fetch_avatar(avatar_url: str) -> bytes:
    if urlparse(avatar_url).hostname != AVATAR_HOST or not avatar_url.startswith("https://"):
        raise ValueError("avatar must come from the avatar service")
    with urllib.request.urlopen(avatar_url) as resp:  # noqa: S310 - host checked above
        return resp.read()
'''),
    # ---- broken_auth
    dict(category="broken_auth", split="tune", defect='''def login(users, username, password):
    user = users.get(username)
    if user is None:
        return False
    if user["password"] == password:  # DEFECT
        return True
    return False
''', clean='''import hashlib
import hmac


def login(users, username, password):
    user = users.get(username)
    if user is None:
        return False
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), user["salt"], 600_000)
    return hmac.compare_digest(digest, user["hash"])
'''),
    dict(category="broken_auth", split="held", defect='''import jwt


def current_user(token: str, key: str) -> str:
    claims = jwt.decode(token, key, options={"verify_signature": False})  # DEFECT
    return claims["sub"]
''', clean='''import jwt


def current_user(token: str, key: str) -> str:
    claims = jwt.decode(token, key, algorithms=["HS256"])
    return claims["sub"]
'''),
    # ---- session_fixation
    dict(category="session_fixation", split="tune", defect='''from flask import request, session


def sign_in(user):
    session["session_id"] = request.args.get("sid")  # DEFECT
    session["user"] = user.id
''', clean='''import secrets

from flask import session


def sign_in(user):
    session.clear()
    session["session_id"] = secrets.token_urlsafe(32)
    session["user"] = user.id
'''),
    dict(category="session_fixation", split="held", defect='''def complete_login(req, user):
    sid = req.cookies.get("sid")
    req.session["sid"] = req.cookies["sid"]  # DEFECT
    req.session["user_id"] = user.pk
    return sid
''', clean='''import secrets


def complete_login(req, user):
    req.session.clear()
    req.session["sid"] = secrets.token_urlsafe(32)
    req.session["user_id"] = user.pk
    return req.session["sid"]
'''),
    # ---- sensitive_data_exposure
    dict(category="sensitive_data_exposure", split="tune", defect='''import logging

log = logging.getLogger(__name__)


def authenticate(username, password):
    log.info("login attempt for %s with password %s", username, password)  # DEFECT
    return username.isalnum()
''', clean='''import logging

log = logging.getLogger(__name__)


def authenticate(username, password):
    log.info("login attempt for %s", username)
    return username.isalnum()
'''),
    dict(category="sensitive_data_exposure", split="held", defect='''def debug_payment(card):
    print("charging card", card.number, "token", card.token)  # DEFECT
    return card.last4
''', clean='''def debug_payment(card):
    print("charging card ending in", card.last4)
    return card.last4
'''),
    # ---- hardcoded_secret
    dict(category="hardcoded_secret", split="tune", defect='''import boto3


def client():
    password = "Sup3rS3cret!2024"  # DEFECT
    return boto3.client("s3", aws_secret_access_key=password)
''', clean='''import os

import boto3


def client():
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    return boto3.client("s3", aws_secret_access_key=secret)
'''),
    dict(category="hardcoded_secret", split="held", defect='''import psycopg


def connect():
    return psycopg.connect(host="db", user="app", password="hunter2hunter2")  # DEFECT
''', clean='''import os

import psycopg


def connect():
    return psycopg.connect(host="db", user="app", password=os.environ["DB_PASSWORD"])
'''),
    # ---- security_misconfiguration
    dict(category="security_misconfiguration", split="tune", defect='''from flask import Flask

app = Flask(__name__)

if __name__ == "__main__":
    app.run(host="0.0.0.0", debug=True)  # DEFECT
''', clean='''import os

from flask import Flask

app = Flask(__name__)

if __name__ == "__main__":
    app.run(host="127.0.0.1", debug=os.environ.get("FLASK_DEBUG") == "1")
'''),
    dict(category="security_misconfiguration", split="held", defect='''import requests


def get_status(url):
    resp = requests.get(url, verify=False, timeout=10)  # DEFECT
    return resp.status_code
''', clean='''import requests


def get_status(url):
    resp = requests.get(url, timeout=10)
    return resp.status_code
'''),
    # ---- cors
    dict(category="cors", split="tune", defect='''from flask import Flask

app = Flask(__name__)


@app.after_request
def add_cors(resp):
    resp.headers["Access-Control-Allow-Origin"] = "*"  # DEFECT
    resp.headers["Access-Control-Allow-Credentials"] = "true"
    return resp
''', clean='''from flask import Flask

app = Flask(__name__)
TRUSTED = "https://app.example.com"


@app.after_request
def add_cors(resp):
    resp.headers["Access-Control-Allow-Origin"] = TRUSTED
    resp.headers["Access-Control-Allow-Credentials"] = "true"
    return resp
'''),
    dict(category="cors", split="held", defect='''from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

app = FastAPI()
app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True)  # DEFECT
''', clean='''from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

app = FastAPI()
app.add_middleware(CORSMiddleware, allow_origins=["https://app.example.com"], allow_credentials=True)
'''),
    # ---- path_traversal
    dict(category="path_traversal", split="tune", defect='''import os

from flask import request, send_file

BASE = "/srv/files"


def download():
    return send_file(os.path.join(BASE, request.args["name"]))  # DEFECT
''', clean='''from pathlib import Path

from flask import abort, request, send_file

BASE = Path("/srv/files").resolve()


def download():
    target = (BASE / request.args["name"]).resolve()
    if not target.is_relative_to(BASE):
        abort(404)
    return send_file(target)
'''),
    dict(category="path_traversal", split="held", defect='''import tarfile


def unpack(archive_path, dest):
    with tarfile.open(archive_path) as tar:
        tar.extractall(dest)  # DEFECT
''', clean='''import tarfile


def unpack(archive_path, dest):
    with tarfile.open(archive_path) as tar:
        tar.extractall(dest, filter="data")
'''),
    # ---- insecure_deserialization
    dict(category="insecure_deserialization", split="tune", defect='''import yaml


def load_config(path):
    with open(path) as f:
        return yaml.load(f, Loader=yaml.Loader)  # DEFECT
''', clean='''import yaml


def load_config(path):
    with open(path) as f:
        return yaml.safe_load(f)
'''),
    dict(category="insecure_deserialization", split="held", defect='''import base64
import pickle


def restore_cart(cookie_value: str):
    return pickle.loads(base64.b64decode(cookie_value))  # DEFECT
''', clean='''import base64
import json


def restore_cart(cookie_value: str):
    return json.loads(base64.b64decode(cookie_value))
'''),
    # ---- mutable_default
    dict(category="mutable_default", split="tune", defect='''def add_tag(tag, tags=[]):  # DEFECT
    tags.append(tag)
    return tags
''', clean='''def add_tag(tag, tags=None):
    tags = [] if tags is None else tags
    tags.append(tag)
    return tags
'''),
    dict(category="mutable_default", split="held", defect='''class Registry:
    def register(self, name, handlers={}):  # DEFECT
        handlers[name] = True
        return handlers
''', clean='''class Registry:
    def register(self, name, handlers=None):
        handlers = {} if handlers is None else handlers
        handlers[name] = True
        return handlers
'''),
    # ---- bare_except
    dict(category="bare_except", split="tune", defect='''import json


def read_json(text):
    try:
        return json.loads(text)
    except:  # DEFECT
        return None
''', clean='''import json


def read_json(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
'''),
    dict(category="bare_except", split="held", defect='''def to_int(values):
    out = []
    for v in values:
        try:
            out.append(int(v))
        except:  # DEFECT
            continue
    return out
''', clean='''def to_int(values):
    out = []
    for v in values:
        try:
            out.append(int(v))
        except ValueError:
            continue
    return out
'''),
    # ---- resource_leak
    dict(category="resource_leak", split="tune", defect='''def count_lines(path):
    f = open(path)  # DEFECT
    n = sum(1 for _ in f)
    return n
''', clean='''def count_lines(path):
    with open(path) as f:
        return sum(1 for _ in f)
'''),
    dict(category="resource_leak", split="held", defect='''import csv


def first_row(path):
    reader = csv.reader(open(path, newline=""))  # DEFECT
    return next(reader)
''', clean='''import csv


def first_row(path):
    with open(path, newline="") as f:
        return next(csv.reader(f))
'''),
    # ---- off_by_one
    dict(category="off_by_one", split="tune", defect='''def pairwise_sums(values):
    sums = []
    for i in range(len(values) + 1):  # DEFECT
        sums.append(values[i] + values[i - 1])
    return sums
''', clean='''def pairwise_sums(values):
    sums = []
    for i in range(1, len(values)):
        sums.append(values[i] + values[i - 1])
    return sums
'''),
    dict(category="off_by_one", split="held", defect='''def last_word(words):
    if not words:
        return None
    return words[len(words)]  # DEFECT
''', clean='''def last_word(words):
    if not words:
        return None
    return words[-1]
'''),
]


# ---- the tenant's own code: files with no defect that analyzers still flag
# A platform team's services and jobs, written the way such code usually is: containerised services bind every
# interface (bandit B104), ``random`` serves jitter, sampling, shuffling and load balancing rather than secrets
# (B311), and worker loops log a failed item and go on (ruff BLE001). Each such finding is a false alarm here,
# and a team that ships code like this rejects it every time: the analyzer noise that per-tenant suppression
# exists for. Built by hand like the cases above (2026-12-03); the held-out files use other libraries and names
# (FastAPI/uvicorn, aiohttp, a message consumer) than the tuning ones (Flask, http.server, sockets), and nothing
# was tuned on them. Every finding on them is false; review_quality counts them with the clean twins.
NOISE = [
    dict(split='tune', name='health endpoint of a containerised Flask service', code=r'''import os

from flask import Flask, jsonify

app = Flask(__name__)


@app.get("/healthz")
def healthz():
    return jsonify(status="ok")


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8080"))
    app.run(host="0.0.0.0", port=port)
'''),
    dict(split='tune', name='HTTP retries with exponential backoff and jitter', code=r'''import random
import time

import requests


def get_with_retries(url, attempts=5, base_delay=0.5):
    for attempt in range(attempts):
        try:
            resp = requests.get(url, timeout=10)
            resp.raise_for_status()
            return resp.json()
        except requests.RequestException:
            if attempt == attempts - 1:
                raise
            time.sleep(base_delay * 2 ** attempt + random.uniform(0, base_delay))
'''),
    dict(split='tune', name='a worker draining a queue, logging a failed job and going on', code=r'''import logging
import queue

log = logging.getLogger(__name__)


def drain(jobs: queue.Queue, handle) -> int:
    done = 0
    while True:
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            return done
        try:
            handle(job)
            done += 1
        except Exception as exc:
            log.warning("job %s failed: %s", job, exc)
'''),
    dict(split='tune', name='a seeded random sample of CSV rows for a preview', code=r'''import csv
import random


def sample_rows(path, k=100, seed=None):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(seed)
    return rng.sample(rows, min(k, len(rows)))


def preview(path):
    for row in sample_rows(path, k=5):
        print(", ".join(f"{key}={value}" for key, value in row.items()))
'''),
    dict(split='tune', name='a Prometheus-style metrics endpoint on every interface', code=r'''import logging
from http.server import BaseHTTPRequestHandler, HTTPServer

log = logging.getLogger(__name__)
COUNTERS = {"requests": 0}


class MetricsHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = "".join(f"app_{name} {value}\n" for name, value in COUNTERS.items()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)


def serve_metrics(port=9100):
    try:
        HTTPServer(("0.0.0.0", port), MetricsHandler).serve_forever()
    except Exception as exc:
        log.error("metrics server stopped: %s", exc)
'''),
    dict(split='tune', name='shuffled training batches, a failed batch logged and skipped', code=r'''import logging
import random

log = logging.getLogger(__name__)


def batches(items, size, seed=0):
    order = list(items)
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), size):
        yield order[start:start + size]


def train_epoch(model, items, size=32):
    losses = []
    for batch in batches(items, size):
        try:
            losses.append(model.step(batch))
        except Exception as exc:
            log.warning("skipped a batch of %d: %s", len(batch), exc)
    return sum(losses) / max(1, len(losses))
'''),
    dict(split='tune', name='a statsd-style UDP listener', code=r'''import socket


def listen(handle, port=8125):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        data, _ = sock.recvfrom(65535)
        for line in data.decode(errors="replace").splitlines():
            handle(line)
'''),
    dict(split='held', name='a FastAPI service started by uvicorn in its container', code=r'''import uvicorn
from fastapi import FastAPI

api = FastAPI(title="inventory")


@api.get("/items/{item_id}")
async def read_item(item_id: int):
    return {"id": item_id}


def main() -> None:
    uvicorn.run(api, host="0.0.0.0", port=8000, log_level="info")
'''),
    dict(split='held', name='client-side load balancing over replicas', code=r'''import random


class ReplicaPool:
    def __init__(self, urls):
        if not urls:
            raise ValueError("a pool needs at least one replica")
        self.urls = list(urls)
        self.down = set()

    def pick(self):
        live = [u for u in self.urls if u not in self.down] or self.urls
        return random.choice(live)

    def mark_down(self, url):
        self.down.add(url)
'''),
    dict(split='held', name='sampled tracing spans', code=r'''import random
import time
from contextlib import contextmanager

SAMPLE_RATE = 0.05
spans = []


@contextmanager
def traced(name):
    start = time.perf_counter()
    try:
        yield
    finally:
        if random.random() < SAMPLE_RATE:
            spans.append((name, time.perf_counter() - start))
'''),
    dict(split='held', name='a message consumer that logs and drops a bad message', code=r'''import json
import logging

logger = logging.getLogger("consumer")


def on_message(channel, method, body, store):
    try:
        event = json.loads(body)
        store.save(event["id"], event)
    except Exception as err:
        logger.warning("dropping message %s: %s", method.delivery_tag, err)
    finally:
        channel.basic_ack(delivery_tag=method.delivery_tag)
'''),
    dict(split='held', name='an aiohttp error middleware and app runner', code=r'''import logging

from aiohttp import web

logger = logging.getLogger(__name__)


@web.middleware
async def errors(request, handler):
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        logger.error("%s %s failed: %s", request.method, request.path, exc)
        return web.json_response({"error": "internal"}, status=500)


def run():
    app = web.Application(middlewares=[errors])
    web.run_app(app, host="0.0.0.0", port=8080)
'''),
    dict(split='held', name='a health poller with jitter that logs a failed check', code=r'''import logging
import random
import time

log = logging.getLogger(__name__)


def poll(check, every=30.0, jitter=5.0, rounds=None):
    n = 0
    while rounds is None or n < rounds:
        try:
            check()
        except Exception as e:
            log.info("check failed, will retry: %s", e)
        n += 1
        time.sleep(every + random.uniform(-jitter, jitter))
'''),
]


def load(split: str | None = None) -> list[dict]:
    """Cases with ``code`` (defect, markers stripped), ``lines`` (defect lines) and ``clean``."""
    out = []
    for n, case in enumerate(CASES):
        if split and case["split"] != split:
            continue
        lines, labels = [], []
        for i, line in enumerate(case["defect"].splitlines(), start=1):
            if line.rstrip().endswith("# DEFECT"):
                labels.append(i)
                line = line.rstrip()[: -len("# DEFECT")].rstrip()
            lines.append(line)
        out.append(dict(case, id=f"{case['category']}-{case['split']}", code="\n".join(lines) + "\n", lines=labels))
    return out


def load_noise(split: str | None = None) -> list[dict]:
    """The tenant's own files with no defect (``NOISE``), each with an ``id`` (its half and its place there);
    any finding on them is false."""
    out, seen = [], {"tune": 0, "held": 0}
    for n in NOISE:
        if not split or n["split"] == split:
            out.append(dict(n, id=f"noise-{n['split']}-{seen[n['split']]}"))
        seen[n["split"]] += 1
    return out
