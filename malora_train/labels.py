"""The label convention shared by the data stage and the models: positions labelled ``IGNORE_INDEX``
(prompt, padding) carry no loss; it is PyTorch's ``cross_entropy`` default ``ignore_index``."""

IGNORE_INDEX = -100
