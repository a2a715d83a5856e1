"""The demo: a simulated store and its shoppers driving a real Kassa server over HTTP.

`store` owns the catalog Kassa sees (products, offers, placements); `simulator` owns the shoppers and
the hidden ground truth of what they accept; `driver` replays checkouts against the API; `stats`
keeps score per traffic slice; `view` draws it; `run` wires it all into ``kassa demo``.
"""
