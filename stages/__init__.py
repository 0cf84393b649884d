"""advgen's command line: one module per DVC stage, all registered on one typer app.

Each stage parses options, reads its inputs, calls the library in ``pipeline``
and writes its outputs. Run as ``advgen STAGE ...`` or ``python -m advgen STAGE ...``.
"""
