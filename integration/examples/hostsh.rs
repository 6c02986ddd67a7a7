//! Runs a shell script inside a fresh test host and prints its output (for exploring).
fn main() -> anyhow::Result<()> {
    let script = std::fs::read_to_string(std::env::args().nth(1).expect("script path"))?;
    let h = weave_integration::Host::new()?;
    let out = h.sh(&script)?;
    print!("{}{}", out.stdout, out.stderr);
    Ok(())
}
