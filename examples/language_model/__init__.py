"""Word-level LSTM language model on the Penn Treebank with an IMISoftmax output layer."""
