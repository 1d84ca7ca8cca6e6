"""The batch every data module yields, and the one convention training relies on.

`{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`, where a label of `IGNORE_INDEX` marks a position
that is not scored: the padding of a last, short evaluation window, the context already scored by an earlier
window (`data.eval_stride`), every MQAR position that is not an answer. Loss, accuracy and the mixer statistics
count only the other positions. -100 is also `F.cross_entropy`'s default `ignore_index`.
"""

IGNORE_INDEX = -100
