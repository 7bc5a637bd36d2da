"""No import circle anywhere in mmfuse, between any two modules.

``lint-imports`` (pyproject.toml) keeps the layers and, with its ``acyclic_siblings`` contract, the
modules of each package free of circles; that contract compares siblings only, so a module that
imports its own package's ``__init__`` (which imports the module back) passes it. This test walks
every import grimp finds, function-level and ``TYPE_CHECKING`` ones included, so no circle is
hidden by importing lazily.
"""

from __future__ import annotations

import grimp


def test_no_module_imports_itself_through_a_chain() -> None:
    graph = grimp.build_graph("mmfuse", exclude_type_checking_imports=False, cache_dir=None)
    circles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if graph.chain_exists(importer=imported, imported=importer):
                back = graph.find_shortest_chain(importer=imported, imported=importer) or ()
                circles.append(" -> ".join((importer, *back)))
    assert not circles, "import circles:\n" + "\n".join(circles)
