"""The house's shape: no import circle anywhere in the package (the layer contracts themselves are pyproject's
``[tool.importlinter]``, checked by ``lint-imports`` in .ci/run)."""

from __future__ import annotations

import grimp


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("redteam")
    circles = sorted(
        (module, imported)
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if module < imported and graph.chain_exists(importer=imported, imported=module)
    )
    chains = [" -> ".join(graph.find_shortest_chain(importer=a, imported=b) or ()) for a, b in circles[:5]]
    assert not circles, f"{len(circles)} import circles, e.g. {chains}"
