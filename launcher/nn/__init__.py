"""The model (encoder + projection head) and where its tensors live: imported by workers, the
evaluation, the driver's merge of the winner and export — never at the driver's planning time."""
