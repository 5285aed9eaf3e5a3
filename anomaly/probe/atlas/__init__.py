"""The atlas: the anomaly across real models, context lengths and texts.

``python -m anomaly.probe.atlas --models smollm2-135m gemma3-270m --tokens 512 2048 8192
--out DIR`` probes every model at every length on the same texts (prose and code from the
bundled corpora, one window per document: its first ``T`` tokens) and writes one comparison.

The unit of replication is the *text*: the same documents are probed by every model at
every length, so models and lengths are compared text by text (paired), and every interval
is over texts (:mod:`anomaly.replication`), never over the heads, slices or pairs one text
yields.

A full atlas takes hours on a few cores, so it is resumable: every probe's readings (a
*cell*: one model, text and length) are saved in ``DIR/atlas_cells/`` as soon as they are
measured, and running the same command again reuses each saved cell whose key matches
exactly (the model's bytes, the text, the token ids, dtype, device type and the code that
measured it; :mod:`~anomaly.probe.atlas.cells`), so only what is missing or stale is probed.

Parts: :mod:`~anomaly.probe.atlas.readings` (what is read off one probe),
:mod:`~anomaly.probe.atlas.texts` (which documents), :mod:`~anomaly.probe.atlas.cells`
(the saved readings and their keys), :mod:`~anomaly.probe.atlas.tables` (the comparison
over texts), :mod:`~anomaly.probe.atlas.plots` (its figures) and the command,
:mod:`~anomaly.probe.atlas.cli`.
"""
