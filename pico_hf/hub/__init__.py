"""Publishing to the Hugging Face Hub: the commit queue (`commits`), the Trainer callbacks that feed it
(`callback`), model cards (`cards`) and the publishing command (`publish`)."""
