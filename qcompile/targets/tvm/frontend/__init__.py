"""The TVM front end: the QDQ model's integer form imported into Relax (requantization as fixed-point integer
math, :mod:`.relax_import`) with a ``main`` and a ``probe`` entry point (:mod:`.program`)."""
