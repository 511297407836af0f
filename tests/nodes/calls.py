"""Call a node's run as the engine does: inputs not given take their declared defaults."""

from typing import Any

from graphflow.context import RunContext
from graphflow.node import REQUIRED, Node


def run_node(node_type: type[Node], ctx: RunContext, **values: Any) -> dict[str, Any]:
    defaults = {spec.name: None if spec.default is REQUIRED else spec.default
                for spec in node_type.inputs if spec.name not in values}
    return node_type().run(ctx, **defaults, **values)
