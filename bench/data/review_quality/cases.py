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
