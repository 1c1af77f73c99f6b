"""The compute floor: model loading, layer-range compute, sampling, dtypes and
the request types. It imports nothing of pipeline/, draft_models/, server/
or cluster/; they all stand on it."""
