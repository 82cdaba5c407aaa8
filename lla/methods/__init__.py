"""One file per method; each class is a LightningModule subclassing :class:`lla.engine.LocalLearner`."""
