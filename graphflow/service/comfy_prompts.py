"""What the ComfyUI endpoints remember of each prompt posted to /prompt, beside its job in the queue database.

A job runs a graphflow document; a ComfyUI client speaks of the prompt it posted (its node ids, its number, its
client id). One row per prompt keeps that prompt and the map from its node ids to the graphflow nodes the import
made, so events, history and errors are told back in the client's terms.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS comfy_prompts (
    number INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    client_id TEXT,
    prompt TEXT NOT NULL,
    node_names TEXT NOT NULL,
    outputs TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class ComfyPrompt:
    """A posted prompt: `node_names` maps each ComfyUI node id to the graphflow nodes it became, `outputs` each
    output node's id (SaveImage, PreviewImage) to the graphflow node that makes its images; the job's document
    names that node's result `graph_output(id)`, so the job's summary holds it."""

    job_id: str
    number: int
    client_id: str | None
    prompt: dict[str, Any]
    node_names: dict[str, list[str]]
    outputs: dict[str, str]

    def comfy_node(self, graphflow_node: str) -> str | None:
        """The ComfyUI node id a graphflow node came from; None for one it did not come from."""
        for comfy_id, names in self.node_names.items():
            if graphflow_node in names:
                return comfy_id
        return None

    def output_node(self, graphflow_node: str) -> str | None:
        """The ComfyUI output node id whose images a graphflow node makes; None for any other node."""
        return next((comfy_id for comfy_id, name in self.outputs.items() if name == graphflow_node), None)

    def class_type(self, comfy_id: str | None) -> str | None:
        node = self.prompt.get(comfy_id) if comfy_id is not None else None
        return node.get("class_type") if isinstance(node, dict) else None


def graph_output(comfy_id: str) -> str:
    """The name of the graph output added for a ComfyUI output node."""
    return f"comfy_{comfy_id}"


class ComfyPrompts:
    """The prompts table, in the queue's SQLite file; one connection per thread, as the queue does."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._connection().executescript(_SCHEMA)

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    def add(self, job_id: str, client_id: str | None, prompt: dict[str, Any], node_names: dict[str, list[str]],
            outputs: dict[str, str]) -> int:
        """Record a prompt before its job is queued; its number (ComfyUI's queue position counter)."""
        cursor = self._connection().execute(
            "INSERT INTO comfy_prompts (job_id, client_id, prompt, node_names, outputs) VALUES (?, ?, ?, ?, ?)",
            (job_id, client_id, json.dumps(prompt), json.dumps(node_names), json.dumps(outputs)))
        return int(cursor.lastrowid or 0)

    def get(self, job_id: str) -> ComfyPrompt | None:
        row = self._connection().execute("SELECT * FROM comfy_prompts WHERE job_id = ?", (job_id,)).fetchone()
        return _prompt(row) if row is not None else None

    def newest(self, limit: int | None) -> list[ComfyPrompt]:
        """Prompts oldest first: all of them, or the newest `limit`."""
        rows = self._connection().execute("SELECT * FROM (SELECT * FROM comfy_prompts ORDER BY number DESC LIMIT ?) "
                                          "ORDER BY number", (-1 if limit is None else limit,))
        return [_prompt(row) for row in rows]


def _prompt(row: sqlite3.Row) -> ComfyPrompt:
    return ComfyPrompt(row["job_id"], row["number"], row["client_id"], json.loads(row["prompt"]),
                       json.loads(row["node_names"]), json.loads(row["outputs"]))
