"""The overflow lane: a shed project's excess, diverted by the sink and delivered later, paced.

``lane``: the sink's dedicated producer of diversions; ``chunks``: the drain's deterministic
state machine over one overflow partition.
"""
