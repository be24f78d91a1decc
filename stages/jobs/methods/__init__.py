"""The methods' jobs (``stages.methods.<m>``'s build calls ``stages.jobs.methods.<m>``); no
registry here: the methods are listed by ``stages.methods``."""
