"""The applications built on the library: training scripts (:mod:`leanformer.lab.train`,
``leanformer train NAME``), experiments on real models and data (:mod:`leanformer.lab.experiments`,
``leanformer experiment NAME`` and ``leanformer layers NAME``), the corpora that ship with the
machine (:mod:`leanformer.lab.data`) and the result files and plots they write
(:mod:`leanformer.lab.results`). The library (ops, nn, models, decoding, layers, compress) never
imports this package."""
