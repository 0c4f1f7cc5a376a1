"""Step-size control: the loop's decisions as pure rules, error norms, the controller and the
automatic first step."""
