"""Analytics: every interaction recorded, searchable, and never in the way.

record.py turns a finished Interaction into a stored record (privacy.py decides what text may be
kept); recorder.py hands each finished exchange to the writer process (writer.py, over the
frames of channel.py), which builds the records and writes them to the stores/ chosen in
settings.py; query.py and api.py answer searches; the CLI's analytics commands read the same
stores.
"""
