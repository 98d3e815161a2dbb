"""Sphinx configuration of the jaxce documentation.

The build is offline: no intersphinx inventories are fetched and MathJax is served from the
build itself (``sphinx-mathjax-offline`` copies its MathJax 3 files into ``_static/mathjax``).
Build with ``sphinx-build -W -b html docs docs/_build/html``.
"""

from __future__ import annotations

import os
import re
import sys

import sphinx.ext.autosummary

# Document the checkout this file belongs to, also when another jaxce is installed.
sys.path.insert(0, os.path.abspath(".."))

import jaxce  # noqa: E402

project = "jaxce"
author = "The jaxce authors"
copyright = "2026, The jaxce authors"
release = jaxce.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
]

# Every page is reStructuredText; generated API stubs live beside the family pages.
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build"]
templates_path = ["_templates"]

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# ``jax.typing.ArrayLike`` is a long Union: signatures show the alias as the source writes it.
# Each alias maps to its own name, not to ``jax.typing.ArrayLike``: for an ``@overload``ed
# function Sphinx evaluates an alias's target a second time in the module's namespace, so a
# dotted target would come back as the expanded eight-type Union; its own name comes back as
# the string ``"ArrayLike"``. ``.ci/run`` checks the built pages for an expanded Union.
autodoc_type_aliases = {"ArrayLike": "ArrayLike", "Array": "Array"}
add_module_names = False

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_param = True

html_theme = "sphinx_book_theme"
html_title = f"jaxce {release}"
html_static_path = ["_static"]
html_css_files = ["jaxce.css"]
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "home_page_in_toc": True,
    # Only the long guides get a "Contents" column; elsewhere the text takes the room.
    "secondary_sidebar_items": {
        page: ["page-toc"]
        for page in (
            "getting_started",
            "conventions",
            "large_vocabulary",
            "post_training",
            "examples",
        )
    },
}


# Sphinx writes an alias inside a union as ``TypeAliasForwardRef('...')``; show the bare name.
_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)")


def _plain_aliases(app, what, name, obj, options, signature, return_annotation):
    if signature:
        signature = _FORWARD_REF.sub(r"\1", signature)
    if return_annotation:
        return_annotation = _FORWARD_REF.sub(r"\1", return_annotation)
    return signature, return_annotation


# The summary tables of the API pages: Sphinx joins an overloaded function's signatures (one per
# ``@overload``, e.g. for ``reduction="sum_and_weight"``) with newlines before compacting them,
# and the compacted form of the joined text is ``(-> Array)``. Compact the first one alone.
_mangle_signature = sphinx.ext.autosummary.mangle_signature


def _mangle_first_signature(sig: str, max_chars: int = 30) -> str:
    return _mangle_signature(sig.split("\n", 1)[0], max_chars=max_chars)


sphinx.ext.autosummary.mangle_signature = _mangle_first_signature


def setup(app):
    app.connect("autodoc-process-signature", _plain_aliases)
